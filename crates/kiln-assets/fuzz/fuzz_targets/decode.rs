//! Any bytes through the upload path: probe, decode under limits, and (when it decodes) the
//! cut-out and the quality judge. Must end in `Ok` or a typed error: never a panic, a hang or an
//! allocation past the cap.
#![no_main]

use kiln_assets::{Limits, decode, photo, quality};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small images only, so each input runs in microseconds; min_side 1 lets the cut-out see the
    // degenerate sizes that the product's own 300 px floor keeps away from it.
    let limits = Limits {
        max_bytes: 1 << 20,
        max_side: 1024,
        max_pixels: 256 * 1024,
        min_side: 1,
    };
    let Ok((_, img)) = decode(data, &limits) else {
        return;
    };
    if let Ok(cut) = photo::cut_out_decoded(&img, None) {
        if let Ok((master, _)) = photo::place_on_white(&cut, 64, photo::MASTER_FILL, 0.0) {
            let _ = quality::judge(&master, true);
        }
    }
});
