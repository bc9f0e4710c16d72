//! Where the cut-out model's time goes: `model_profile [side] [tract-resize|tract-conv]` runs
//! U²-Net-p (the vendored file) three times at `side` (320 by default) and prints the time per
//! kind of operation of the last run. Run it single-threaded (`taskset -c 0`). The plan is kiln's
//! (`salient::plan`); tract's other knobs apply from the environment.

/// As in the kiln binary: the model's large tensors are reused, not faulted in afresh.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::time::Instant;
use tract_onnx::prelude::*;
fn main() -> TractResult<()> {
    let bytes = std::fs::read("crates/kiln-assets/models/u2netp.onnx")?;
    let side: usize = std::env::args().nth(1).map_or(Ok(320), |s| s.parse())?;
    // As kiln loads it: its knobs, its own upsampling in place of tract's `Resize` and its own
    // convolutions; with `tract-resize` as a second argument, tract's `Resize` and convolutions
    // kept, with `tract-conv` tract's convolutions alone, to compare.
    let mode = std::env::args().nth(2);
    let plan = if mode.as_deref() == Some("tract-resize") {
        tract_onnx::tract_core::knobs::KnobScope::new([("TRACT_DISABLE_DIRECT_SPATIAL", "true")])?
            .enter(|| {
            tract_onnx::onnx()
                .model_for_read(&mut &bytes[..])?
                .with_input_fact(0, f32::fact([1, 3, side, side]).into())?
                .into_optimized()?
                .into_runnable()
        })?
    } else if mode.as_deref() == Some("tract-conv") {
        kiln_assets::salient::plan_with(&bytes, side, kiln_assets::salient::Convolutions::Tract)?
    } else {
        kiln_assets::salient::plan(&bytes, side)?
    };
    let input: Tensor = tract_ndarray::Array4::<f32>::from_elem((1, 3, side, side), 0.3).into();
    let mut state = tract_onnx::tract_core::plan::SimpleState::new(&plan)?;
    let mut times: HashMap<String, (f64, usize)> = HashMap::new();
    for round in 0..3 {
        let t = Instant::now();
        state.run_plan_with_eval(tvec!(input.clone().into()), |ctx, st, node, inputs| {
            let t = Instant::now();
            let r = tract_onnx::tract_core::plan::eval(ctx, st, node, inputs);
            if round == 2 {
                let e = times.entry(format!("{}", node.op().name())).or_default();
                e.0 += t.elapsed().as_secs_f64() * 1000.0;
                e.1 += 1;
            }
            r
        })?;
        println!("run {round}: {:.0} ms", t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut v: Vec<_> = times.into_iter().collect();
    v.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
    for (k, (ms, n)) in v.iter().take(15) {
        println!("{k:30} {ms:8.1} ms {n}");
    }
    Ok(())
}
