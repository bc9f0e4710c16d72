//! U²-Net-p upsamples 38 times (`F.upsample(.., mode='bilinear')`, ONNX `Resize`, linear,
//! `pytorch_half_pixel`), every time by a whole factor: 2 inside its blocks, 2 to 32 for its
//! side outputs. tract's general `Resize` plans each axis and copies its input on every call,
//! one tap at a time; `Upsample` does the same arithmetic for a whole factor with the taps
//! fixed per phase, a row at a time (`swap_in` puts it in place of every such `Resize`).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::resize::{CoordTransformer, Interpolator, Resize};

/// Bilinear upsampling of the last two axes of a rank-4 f32 tensor by a whole `factor`,
/// half-pixel centres, edges clamped: output pixel `x` reads the input at
/// `(x + 0.5) / factor - 0.5`, as ONNX `Resize` (linear, `pytorch_half_pixel` or
/// `half_pixel`) does.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Upsample {
    pub factor: usize,
}

/// An output pixel's two taps: (index offset, weight).
type Taps = [(isize, f32); 2];

/// The two taps (index offset, weight) of each phase `r` in `0..factor`: output `factor * i + r`
/// is `w0 * in[i + o0] + w1 * in[i + o1]`, offsets -1, 0 or 1.
#[allow(clippy::cast_precision_loss)]
fn taps(factor: usize) -> Vec<Taps> {
    (0..factor)
        .map(|r| {
            let d = (r as f32 + 0.5) / factor as f32 - 0.5;
            if d < 0.0 {
                [(-1, -d), (0, 1.0 + d)]
            } else {
                [(0, 1.0 - d), (1, d)]
            }
        })
        .collect()
}

/// `i + offset` clamped to `0..len`.
fn clamp(i: usize, offset: isize, len: usize) -> usize {
    i.saturating_add_signed(offset).min(len - 1)
}

/// One `h` x `w` plane upsampled by `taps.len()` into `out` (`h * factor` rows of
/// `w * factor`), through `rows` (`h` rows of `w * factor`, scratch).
fn plane(src: &[f32], w: usize, h: usize, taps: &[Taps], rows: &mut [f32], out: &mut [f32]) {
    let factor = taps.len();
    let ow = w * factor;
    // Along each row: the taps are fixed per phase.
    for (row, dst) in src.chunks_exact(w).zip(rows.chunks_exact_mut(ow)) {
        for (i, cell) in dst.chunks_exact_mut(factor).enumerate() {
            for (v, [(o0, w0), (o1, w1)]) in cell.iter_mut().zip(taps) {
                *v = w0 * row[clamp(i, *o0, w)] + w1 * row[clamp(i, *o1, w)];
            }
        }
    }
    // Down the columns: each output row is a weighted sum of two whole rows.
    for (j, band) in out.chunks_exact_mut(ow * factor).enumerate() {
        for (dst, [(o0, w0), (o1, w1)]) in band.chunks_exact_mut(ow).zip(taps) {
            let a = &rows[clamp(j, *o0, h) * ow..][..ow];
            let b = &rows[clamp(j, *o1, h) * ow..][..ow];
            for ((d, a), b) in dst.iter_mut().zip(a).zip(b) {
                *d = w0 * a + w1 * b;
            }
        }
    }
}

impl Op for Upsample {
    fn name(&self) -> StaticName {
        "BilinearUpsample".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("factor: {}", self.factor)])
    }

    op_as_typed_op!();
}

impl EvalOp for Upsample {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        ensure!(
            shape.len() == 4,
            "BilinearUpsample wants NCHW, got {shape:?}"
        );
        let (h, w, f) = (shape[2], shape[3], self.factor);
        let out_shape = [shape[0], shape[1], h * f, w * f];
        let src = input.try_as_plain_ram()?;
        let src = src.as_slice::<f32>()?;
        let mut out = vec![0f32; src.len() * f * f];
        let mut rows = vec![0f32; h * w * f];
        let taps = taps(f);
        if h * w > 0 {
            for (s, o) in src
                .chunks_exact(h * w)
                .zip(out.chunks_exact_mut(h * w * f * f))
            {
                plane(s, w, h, &taps, &mut rows, o);
            }
        }
        let out = tract_ndarray::ArrayD::from_shape_vec(&out_shape[..], out)?.into_tensor();
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Upsample {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        ensure!(s.rank() == 4 && inputs[0].datum_type == f32::datum_type());
        let f = self.factor;
        let shape: TVec<TDim> = tvec![
            s[0].clone(),
            s[1].clone(),
            s[2].clone() * f,
            s[3].clone() * f
        ];
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// Puts `Upsample` in place of every bilinear, half-pixel `Resize` of `model` that scales
/// height and width by the same whole factor; returns how many it replaced.
pub fn swap_in(model: &mut TypedModel) -> TractResult<usize> {
    let mut swapped = 0;
    for id in model.eval_order()? {
        let node = &model.nodes[id];
        let Some(resize) = node.op_as::<Resize>() else {
            continue;
        };
        let half_pixel = matches!(
            resize.coord_transformer,
            CoordTransformer::PytorchHalfPixel | CoordTransformer::HalfPixel
        );
        if !half_pixel || resize.interpolator != Interpolator::Linear {
            continue;
        }
        let input = model.outlet_fact(node.inputs[0])?;
        let output = &node.outputs[0].fact;
        if input.datum_type != f32::datum_type() || input.rank() != 4 || output.rank() != 4 {
            continue;
        }
        let (Some(i), Some(o)) = (input.shape.as_concrete(), output.shape.as_concrete()) else {
            continue;
        };
        let factor = o[2] / i[2].max(1);
        let whole = i[0] == o[0] && i[1] == o[1] && factor > 1;
        if !whole || o[2] != i[2] * factor || o[3] != i[3] * factor {
            continue;
        }
        let patch = TypedModelPatch::replace_single_op(
            model,
            node,
            &node.inputs[..1],
            Upsample { factor },
        )?;
        patch.apply(model)?;
        swapped += 1;
    }
    Ok(swapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same numbers as tract's own `Resize` (linear, `pytorch_half_pixel`), for every
    /// factor U²-Net-p uses, on odd and even sides and a random input (seeded).
    #[test]
    fn upsample_matches_tracts_resize() {
        let seed = 0x5EED_u64;
        println!("seed {seed}");
        let mut state = seed;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            #[allow(clippy::cast_precision_loss)]
            let v = (state % 10_000) as f32 / 1000.0 - 5.0;
            v
        };
        for (factor, h, w) in [
            (2, 5, 5),
            (2, 10, 7),
            (4, 3, 6),
            (8, 2, 2),
            (16, 1, 3),
            (32, 2, 1),
        ] {
            let data: Vec<f32> = (0..2 * 3 * h * w).map(|_| next()).collect();
            let input = tract_ndarray::Array4::from_shape_vec((2, 3, h, w), data)
                .expect("shape")
                .into_tensor();
            let ours = Upsample { factor }
                .eval_out_of_plan(tvec!(input.clone().into_tvalue()))
                .expect("upsample")
                .expect("evaluates out of a plan");
            let resize = Resize {
                coord_transformer: CoordTransformer::PytorchHalfPixel,
                interpolator: Interpolator::Linear,
                nearest: tract_onnx::tract_core::ops::nn::resize::Nearest::Floor,
                optional_scales_input: Some(1),
                optional_sizes_input: None,
            };
            #[allow(clippy::cast_precision_loss)]
            let f = factor as f32;
            let scales = tract_ndarray::arr1(&[1.0f32, 1.0, f, f]).into_tensor();
            let theirs = resize
                .eval_out_of_plan(tvec!(input.into_tvalue(), scales.into_tvalue()))
                .expect("resize")
                .expect("evaluates out of a plan");
            let (a, b) = (
                ours[0].to_plain_array_view::<f32>().expect("ours"),
                theirs[0].to_plain_array_view::<f32>().expect("theirs"),
            );
            assert_eq!(a.shape(), b.shape(), "factor {factor}");
            let worst = a
                .iter()
                .zip(b.iter())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "factor {factor} {h}x{w}: off by {worst}");
        }
    }
}
