//! U²-Net-p's convolutions, all 118 of them 3x3, stride 1, one group, padded by their
//! dilation (1, 2, 4 or 8), with their batch norm folded in and, for 112, a ReLU after. tract
//! runs them as im2col and a matrix product: 0.77 s of the model's 0.92 s on one core, about
//! 25 GMAC/s (onnxruntime runs the whole model in 0.44 s). `Conv3x3` computes them directly,
//! the way onnxruntime's MLAS does: per block of four output channels and a strip of output
//! pixels, the accumulators stay in registers while every input channel and tap is folded in,
//! each input vector loaded once for the four channels. The ReLU is applied before the store.
//!
//! Safe SIMD through `pulp`: AVX-512 (16 lanes, 32 registers) or AVX2 with FMA (8 lanes,
//! 16 registers), chosen at run time; on a machine with neither, tract's own convolution stays.

use std::sync::Arc;

use pulp::{Simd, WithSimd};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::PaddingSpec;
use tract_onnx::tract_core::ops::cnn::conv::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// Output channels computed together: each input vector feeds this many accumulators.
const R: usize = 4;

/// A 3x3 convolution, stride 1, padded by its dilation on every side, on one NCHW image
/// (batch 1) of `c_in` channels, to `c_out` channels, ReLU after when `relu`.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    pub c_in: usize,
    pub c_out: usize,
    pub dilation: usize,
    pub relu: bool,
    /// The weights by block of `R` output channels: `[block][c_in][tap][R]`, zero past `c_out`.
    packed: Arc<Vec<f32>>,
    /// The bias, `R` per block, zero past `c_out`.
    bias: Arc<Vec<f32>>,
}

/// Equal when they compute the same: the same shape and bit for bit the same weights.
impl PartialEq for Conv3x3 {
    fn eq(&self, other: &Self) -> bool {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        (self.c_in, self.c_out, self.dilation, self.relu)
            == (other.c_in, other.c_out, other.dilation, other.relu)
            && bits(&self.packed) == bits(&other.packed)
            && bits(&self.bias) == bits(&other.bias)
    }
}

impl Eq for Conv3x3 {}

impl Conv3x3 {
    /// From an OIHW kernel (`c_out` x `c_in` x 3 x 3) and a bias of `c_out`.
    pub fn new(kernel: &[f32], bias: &[f32], c_in: usize, dilation: usize, relu: bool) -> Self {
        let c_out = bias.len();
        assert_eq!(kernel.len(), c_out * c_in * 9, "an OIHW 3x3 kernel");
        let blocks = c_out.div_ceil(R);
        let mut packed = vec![0f32; blocks * c_in * 9 * R];
        for o in 0..c_out {
            let (b, r) = (o / R, o % R);
            for c in 0..c_in {
                for t in 0..9 {
                    packed[((b * c_in + c) * 9 + t) * R + r] = kernel[(o * c_in + c) * 9 + t];
                }
            }
        }
        let mut padded_bias = vec![0f32; blocks * R];
        padded_bias[..c_out].copy_from_slice(bias);
        Conv3x3 {
            c_in,
            c_out,
            dilation,
            relu,
            packed: Arc::new(packed),
            bias: Arc::new(padded_bias),
        }
    }

    /// Whether this machine runs it (AVX-512, or AVX2 with FMA).
    pub fn supported() -> bool {
        !matches!(pulp::Arch::new(), pulp::Arch::Scalar)
    }

    /// The convolution of `input` (`c_in` planes of `h` x `w`) into `out` (`c_out` planes).
    pub fn run(&self, input: &[f32], h: usize, w: usize, out: &mut [f32]) {
        pulp::Arch::new().dispatch(self.job(input, h, w, out));
    }

    fn job<'a>(&'a self, input: &'a [f32], h: usize, w: usize, out: &'a mut [f32]) -> Job<'a> {
        assert_eq!(input.len(), self.c_in * h * w, "input planes");
        assert_eq!(out.len(), self.c_out * h * w, "output planes");
        Job {
            conv: self,
            input,
            h,
            w,
            out,
        }
    }
}

struct Job<'a> {
    conv: &'a Conv3x3,
    input: &'a [f32],
    h: usize,
    w: usize,
    out: &'a mut [f32],
}

impl WithSimd for Job<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        // 16 lanes have 32 registers: 4 x 5 accumulators, 4 weights, 1 input. 8 lanes have 16:
        // 4 x 2, 4 and 1. Narrow planes take fewer vectors per strip, not to compute lanes
        // that are never stored.
        match self.w.div_ceil(lanes::<S>()) {
            1 => self.strips::<S, 1, One>(simd),
            2 => self.strips::<S, 2, Two>(simd),
            3 if lanes::<S>() >= 16 => self.strips::<S, 3, Three>(simd),
            _ if lanes::<S>() >= 16 => self.strips::<S, 5, Five>(simd),
            _ => self.strips::<S, 2, Two>(simd),
        }
    }
}

#[inline(always)]
fn lanes<S: Simd>() -> usize {
    std::mem::size_of::<S::f32s>() / std::mem::size_of::<f32>()
}

impl Job<'_> {
    #[inline(always)]
    fn strips<S: Simd, const P: usize, K: Block<P>>(self, simd: S) {
        let Job {
            conv,
            input,
            h,
            w,
            out,
        } = self;
        if h == 0 || w == 0 {
            return;
        }
        let (d, lanes) = (conv.dilation, lanes::<S>());
        let strip_px = lanes * P;
        // The input padded by `d` on every side (zeros), each row long enough that a strip's
        // last vector, read at the last tap, stays inside it: no masks, no bounds to check
        // per tap. Lanes past `w` compute what is never stored.
        let stride = w.div_ceil(strip_px) * strip_px + 2 * d;
        let rows = h + 2 * d;
        let plane = rows * stride;
        let mut padded = vec![0f32; conv.c_in * plane];
        for (src, dst) in input
            .chunks_exact(h * w)
            .zip(padded.chunks_exact_mut(plane))
        {
            for (s, t) in src
                .chunks_exact(w)
                .zip(dst[d * stride..].chunks_exact_mut(stride))
            {
                t[d..d + w].copy_from_slice(s);
            }
        }
        let zero = simd.splat_f32s(0.0);
        let blocks = conv.c_out.div_ceil(R);
        let taps = conv.c_in * 9 * R;
        for y in 0..h {
            for b in 0..blocks {
                let weights = &conv.packed[b * taps..(b + 1) * taps];
                let bias = &conv.bias[b * R..(b + 1) * R];
                for x0 in (0..w).step_by(strip_px) {
                    let strip = Strip {
                        weights,
                        bias,
                        padded: &padded,
                        plane,
                        stride,
                        y,
                        x0,
                        d,
                    };
                    let acc = K::run(simd, &strip);
                    // Only the channels and pixels that exist are stored.
                    let outputs = conv.c_out - b * R;
                    for (p, vectors) in acc.iter().enumerate() {
                        let x = x0 + p * lanes;
                        if x >= w {
                            break;
                        }
                        let n = (w - x).min(lanes);
                        for (r, &v) in vectors.iter().enumerate().take(outputs) {
                            let row = (b * R + r) * h + y;
                            let dst = &mut out[row * w + x..row * w + x + n];
                            let v = if conv.relu { simd.max_f32s(v, zero) } else { v };
                            if n == lanes {
                                dst.copy_from_slice(bytemuck::cast_slice(&[v]));
                            } else {
                                simd.partial_store_f32s(dst, v);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `$name`: one block of `R` output channels on the vectors `$p` (0, 1, ...) of row `y` from
/// `x0`: the bias plus every input channel's nine taps. Written out per vector so that every
/// accumulator is a register: indexed in a loop, they lived on the stack, one store per FMA.
macro_rules! block {
    ($name:ident, $n:literal, [$(($p:literal, $a0:ident, $a1:ident, $a2:ident, $a3:ident)),+]) => {
        struct $name;

        impl Block<$n> for $name {
        #[inline(always)]
        fn run<S: Simd>(simd: S, strip: &Strip<'_>) -> [[S::f32s; R]; $n] {
            let Strip { weights, bias, padded, plane, stride, y, x0, d } = *strip;
            let lanes = lanes::<S>();
            let init = [
                simd.splat_f32s(bias[0]),
                simd.splat_f32s(bias[1]),
                simd.splat_f32s(bias[2]),
                simd.splat_f32s(bias[3]),
            ];
            $(
                let [mut $a0, mut $a1, mut $a2, mut $a3] = init;
            )+
            for (channel, w9) in padded.chunks_exact(plane).zip(weights.chunks_exact(9 * R)) {
                for ky in 0..3 {
                    let start = (y + ky * d) * stride + x0;
                    let row = &channel[start..start + 2 * d + $n * lanes];
                    for kx in 0..3 {
                        let w = &w9[(ky * 3 + kx) * R..(ky * 3 + kx + 1) * R];
                        let (w0, w1, w2, w3) = (
                            simd.splat_f32s(w[0]),
                            simd.splat_f32s(w[1]),
                            simd.splat_f32s(w[2]),
                            simd.splat_f32s(w[3]),
                        );
                        let taps = &row[kx * d..kx * d + $n * lanes];
                        $(
                            let v: S::f32s = bytemuck::pod_read_unaligned(bytemuck::cast_slice(
                                &taps[$p * lanes..($p + 1) * lanes],
                            ));
                            $a0 = simd.mul_add_f32s(v, w0, $a0);
                            $a1 = simd.mul_add_f32s(v, w1, $a1);
                            $a2 = simd.mul_add_f32s(v, w2, $a2);
                            $a3 = simd.mul_add_f32s(v, w3, $a3);
                        )+
                    }
                }
            }
            [$([$a0, $a1, $a2, $a3]),+]
        }
        }
    };
}

/// What a strip's kernel reads: one block's weights and bias, the padded input (`plane` values
/// per channel, rows of `stride`), and where the strip starts (row `y`, column `x0`) at
/// dilation `d`.
#[derive(Clone, Copy)]
struct Strip<'a> {
    weights: &'a [f32],
    bias: &'a [f32],
    padded: &'a [f32],
    plane: usize,
    stride: usize,
    y: usize,
    x0: usize,
    d: usize,
}

/// The kernel of `P` vectors per strip.
trait Block<const P: usize> {
    fn run<S: Simd>(simd: S, strip: &Strip<'_>) -> [[S::f32s; R]; P];
}

block!(
    Five,
    5,
    [
        (0, a00, a01, a02, a03),
        (1, a10, a11, a12, a13),
        (2, a20, a21, a22, a23),
        (3, a30, a31, a32, a33),
        (4, a40, a41, a42, a43)
    ]
);
block!(
    Three,
    3,
    [
        (0, a00, a01, a02, a03),
        (1, a10, a11, a12, a13),
        (2, a20, a21, a22, a23)
    ]
);
block!(Two, 2, [(0, a00, a01, a02, a03), (1, a10, a11, a12, a13)]);
block!(One, 1, [(0, a00, a01, a02, a03)]);

impl Op for Conv3x3 {
    fn name(&self) -> StaticName {
        "Conv3x3".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} -> {} channels, dilation {}, relu {}",
            self.c_in, self.c_out, self.dilation, self.relu
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Conv3x3 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        ensure!(
            shape.len() == 4 && shape[0] == 1 && shape[1] == self.c_in,
            "Conv3x3 wants 1 x {} x H x W, got {shape:?}",
            self.c_in
        );
        let (h, w) = (shape[2], shape[3]);
        let src = input.try_as_plain_ram()?;
        let src = src.as_slice::<f32>()?;
        let mut out = vec![0f32; self.c_out * h * w];
        self.run(src, h, w, &mut out);
        let out = tract_ndarray::ArrayD::from_shape_vec(&[1, self.c_out, h, w][..], out)?;
        Ok(tvec!(out.into_tensor().into_tvalue()))
    }
}

impl TypedOp for Conv3x3 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        ensure!(s.rank() == 4 && inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact([
            s[0].clone(),
            self.c_out.into(),
            s[2].clone(),
            s[3].clone()
        ])))
    }

    as_op!();
}

/// Puts `Conv3x3` in place of every convolution of `model` it computes (a ReLU right after
/// folded in); returns how many it replaced. Nothing, where this machine has no SIMD for it.
pub fn swap_in(model: &mut TypedModel) -> TractResult<usize> {
    if !Conv3x3::supported() {
        return Ok(0);
    }
    let mut swapped = 0;
    for id in model.eval_order()? {
        let node = &model.nodes[id];
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        let Some(Plain {
            kernel,
            bias,
            dilation,
        }) = plain_3x3(model, node, conv)?
        else {
            continue;
        };
        let relu = relu_after(model, node)?;
        let op = Conv3x3::new(
            &kernel,
            &bias,
            conv.input_channels(),
            dilation,
            relu.is_some(),
        );
        let mut patch = TypedModelPatch::default();
        let tapped = patch.tap_model(model, node.inputs[0])?;
        let wired = patch.wire_node(&node.name, op, &[tapped])?[0];
        let replaced = relu.unwrap_or(node.id);
        patch.shunt_outside(model, OutletId::new(replaced, 0), wired)?;
        patch.apply(model)?;
        swapped += 1;
    }
    Ok(swapped)
}

/// A convolution's constants: its kernel (OIHW), its bias, its dilation.
struct Plain {
    kernel: Vec<f32>,
    bias: Vec<f32>,
    dilation: usize,
}

/// The constants of `conv`, when it is one `Conv3x3` computes.
fn plain_3x3(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<Plain>> {
    let spec = &conv.pool_spec;
    let dilation = spec.dilations.as_ref().map_or(1, |d| d[0]);
    let same =
        |v: &Option<TVec<usize>>, x: usize| v.as_ref().is_none_or(|v| v.iter().all(|&e| e == x));
    let padded = matches!(&spec.padding, PaddingSpec::Explicit(before, after)
        if before.iter().chain(after.iter()).all(|&p| p == dilation));
    let fits = spec.data_format == DataFormat::NCHW
        && *spec.kernel_shape == [3, 3]
        && conv.group == 1
        && conv.q_params.is_none()
        && conv.kernel_fmt == KernelFormat::OIHW
        && same(&spec.strides, 1)
        && same(&spec.dilations, dilation)
        && padded
        && node.inputs.len() == 3;
    if !fits {
        return Ok(None);
    }
    let input = model.outlet_fact(node.inputs[0])?;
    let batch_one = input
        .shape
        .as_concrete()
        .is_some_and(|s| s.len() == 4 && s[0] == 1);
    let kernel = model.outlet_fact(node.inputs[1])?.konst.clone();
    let bias = model.outlet_fact(node.inputs[2])?.konst.clone();
    let (Some(kernel), Some(bias)) = (kernel, bias) else {
        return Ok(None);
    };
    if !batch_one
        || input.datum_type != f32::datum_type()
        || kernel.datum_type() != f32::datum_type()
    {
        return Ok(None);
    }
    let (c_out, c_in) = (conv.output_channels(), conv.input_channels());
    let kernel = kernel.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let bias = bias.cast_to::<f32>()?;
    let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let bias = match bias.len() {
        n if n == c_out => bias,
        1 => vec![bias[0]; c_out],
        _ => return Ok(None),
    };
    if kernel.len() != c_out * c_in * 9 {
        return Ok(None);
    }
    Ok(Some(Plain {
        kernel,
        bias,
        dilation,
    }))
}

/// The ReLU node (`max(x, 0)`) that alone takes `node`'s output, if there is one.
fn relu_after(model: &TypedModel, node: &TypedNode) -> TractResult<Option<usize>> {
    let [next] = &node.outputs[0].successors[..] else {
        return Ok(None);
    };
    if model.outputs.contains(&OutletId::new(node.id, 0)) {
        return Ok(None);
    }
    let next = &model.nodes[next.node];
    let is_max = next
        .op_as::<TypedBinOp>()
        .is_some_and(|op| op.0.is::<tract_onnx::tract_core::ops::math::Max>());
    if !is_max || next.inputs.len() != 2 {
        return Ok(None);
    }
    let other = next.inputs.iter().find(|i| i.node != node.id);
    let Some(other) = other else {
        return Ok(None);
    };
    let zero = model
        .outlet_fact(*other)?
        .konst
        .as_ref()
        .and_then(|k| k.cast_to::<f32>().ok())
        .and_then(|k| {
            k.try_as_plain_ram().ok().and_then(|k| {
                k.as_slice::<f32>()
                    .ok()
                    .map(|s| s.iter().all(|&v| v == 0.0))
            })
        })
        .unwrap_or(false);
    Ok(zero.then_some(next.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The convolution by definition: every output pixel, every input channel and tap, zero
    /// outside the image.
    fn reference(
        kernel: &[f32],
        bias: &[f32],
        input: &[f32],
        (c_in, h, w): (usize, usize, usize),
        d: usize,
        relu: bool,
    ) -> Vec<f32> {
        let c_out = bias.len();
        let mut out = vec![0f32; c_out * h * w];
        for o in 0..c_out {
            for y in 0..h {
                for x in 0..w {
                    let mut sum = f64::from(bias[o]);
                    for c in 0..c_in {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) =
                                    ((y + ky * d).checked_sub(d), (x + kx * d).checked_sub(d));
                                let (Some(iy), Some(ix)) = (iy, ix) else {
                                    continue;
                                };
                                if iy < h && ix < w {
                                    sum += f64::from(kernel[((o * c_in + c) * 3 + ky) * 3 + kx])
                                        * f64::from(input[(c * h + iy) * w + ix]);
                                }
                            }
                        }
                    }
                    #[allow(clippy::cast_possible_truncation)]
                    let v = sum as f32;
                    out[(o * h + y) * w + x] = if relu { v.max(0.0) } else { v };
                }
            }
        }
        out
    }

    type Runner = Box<dyn Fn(Job<'_>)>;

    /// The instruction sets this machine has, each with a way to run a job on it.
    fn instruction_sets() -> Vec<(&'static str, Runner)> {
        let mut sets: Vec<(&'static str, Runner)> = Vec::new();
        if let Some(simd) = pulp::x86::V4::try_new() {
            sets.push((
                "AVX-512",
                Box::new(move |job| pulp::Simd::vectorize(simd, job)),
            ));
        }
        if let Some(simd) = pulp::x86::V3::try_new() {
            sets.push((
                "AVX2",
                Box::new(move |job| pulp::Simd::vectorize(simd, job)),
            ));
        }
        println!(
            "instruction sets: {:?}",
            sets.iter().map(|s| s.0).collect::<Vec<_>>()
        );
        sets
    }

    /// Every strip width (1, 2, 3 and 5 vectors, with and without a partial last vector), each
    /// dilation U²-Net-p uses, output channels that do and do not fill a block of four, a single
    /// input channel and many, with and without the ReLU: the same numbers as the definition.
    #[test]
    fn conv3x3_matches_the_definition() {
        if !Conv3x3::supported() {
            println!("no AVX2 or AVX-512 here: tract's convolution runs instead");
            return;
        }
        let seed = 0xC0_417_u64;
        println!("seed {seed}");
        let mut state = seed;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            #[allow(clippy::cast_precision_loss)]
            let v = (state % 20_000) as f32 / 10_000.0 - 1.0;
            v
        };
        for (c_in, c_out, h, w, d, relu) in [
            (3, 8, 9, 13, 1, true),
            (16, 16, 10, 10, 8, true),
            (5, 1, 7, 20, 1, false),
            (7, 6, 12, 40, 2, true),
            (4, 5, 3, 81, 1, false),
            (9, 4, 6, 37, 4, true),
            (2, 3, 1, 1, 1, false),
            (1, 7, 17, 100, 2, false),
            (6, 13, 5, 160, 1, true),
        ] {
            let kernel: Vec<f32> = (0..c_out * c_in * 9).map(|_| next()).collect();
            let bias: Vec<f32> = (0..c_out).map(|_| next()).collect();
            let input: Vec<f32> = (0..c_in * h * w).map(|_| next()).collect();
            let conv = Conv3x3::new(&kernel, &bias, c_in, d, relu);
            let theirs = reference(&kernel, &bias, &input, (c_in, h, w), d, relu);
            // Every instruction set this machine has: AVX-512's 16 lanes and AVX2's 8 take
            // different strips.
            for (set, run) in instruction_sets() {
                let mut ours = vec![f32::NAN; c_out * h * w];
                run(conv.job(&input, h, w, &mut ours));
                let worst =
                    ours.iter()
                        .zip(&theirs)
                        .map(|(a, b)| (a - b).abs())
                        .fold(
                            0.0f32,
                            |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) },
                        );
                assert!(
                    worst < 1e-4,
                    "{set}: {c_in}->{c_out} {h}x{w} dilation {d} relu {relu}: off by {worst}"
                );
            }
        }
    }
}
