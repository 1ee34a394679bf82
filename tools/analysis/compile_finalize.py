"""Would ``torch.compile`` of the layer's finalize pay at a launch-bound shape? (issue 18's optional step)

The finalize is what a windowed forward computes between the batch's moments and the normalize op: compensation
(Eq. 7-8, 10), the window's sums (Eq. 9-11), the finiteness decision and fallback, the exact backward's history
terms and the running statistics' step. The layer's own ops write into its static bank with ``out=`` and in place,
which ``torch.compile`` does not take whole; this study times a functional stand-in with the same products and
elementwise steps (25 of the layer's 40 extra ops) at the launch case's shape, eager and compiled
(``fullgraph=True, dynamic=False``), and writes what it saw:

    python tools/analysis/compile_finalize.py --out work_dirs/compile_finalize/compile_finalize.json \
        [--no-compile | --cpp-wrapper]

It measures; it does not check the stand-in's numbers against the layer (the layer's tests do that for the layer).
"""
import argparse
import json
import os
import os.path as osp
import time
from typing import Optional

import torch

SHAPE = dict(T=3, C=8, D=72)  # k=4 (3 stored iterations) of the launch case's conv3x3 8 -> 8: D = 8 * 3 * 3


def inputs(t: int, c: int, d: int):
    g = torch.Generator().manual_seed(0)
    return dict(p=torch.randn(t, d, generator=g), gs=torch.randn(c, t, d, generator=g),
                w=torch.randn(c, d, generator=g), r=torch.randn(t, c, generator=g).abs(),
                mu=torch.randn(t, c, generator=g), one=torch.ones(t, 1), m=torch.full((t, 1), 128.0),
                mu_t=torch.randn(c, generator=g), s_t=torch.rand(c, generator=g), run=torch.rand(2, c))


def finalize(p, gs, w, r, mu, one, m, mu_t, s_t, run):
    """The finalize in functional form: the same products and elementwise steps as ``cbn_mmdet.ops.fused``."""
    t, c = mu.shape
    dev = torch.addmm(mu_t, p, w.t(), beta=-1)  # mu_c - mu_t                                  (Eq. 7)
    delta = torch.addmm(mu, p, w.t(), beta=-1)  # mu_c - mu_tau
    s_c = torch.baddbmm(r.t().unsqueeze(-1), gs, w.unsqueeze(-1)).squeeze(-1).t()  # R + <G, W_t>   (Eq. 8)
    s_c = torch.addcmul(s_c, delta, delta, value=-1)
    inside = (s_c > 0).to(s_c.dtype)  # Eq. 10's clamp mask
    q = torch.addcmul(s_c.clamp(min=0), dev, dev)
    tail = torch.cat([dev, q, one.expand(t, c), m.expand(t, c)], 1)
    addend = torch.cat([torch.zeros(c), s_t, torch.ones(c), torch.full((c, ), 127.0)])
    sums = (addend + one.t() @ tail).view(4, c)  # the window's sums, current iteration included  (Eq. 9-11)
    n = sums[2, :1]
    shift = sums[0] / n
    var = sums[1] / n - shift * shift
    ok = torch.isfinite(sums).all()
    u = torch.addcmul(dev, inside, delta, value=-1) - shift  # the history terms
    part = u.t() @ p
    mean_patch = p.sum(0)
    var_kernel = torch.baddbmm(part.unsqueeze(1), inside.t().unsqueeze(1), gs, beta=2).squeeze(1)
    mu_bar = shift + mu_t
    mean, v = torch.where(ok, mu_bar, mu_t), torch.where(ok, var, s_t)  # or the batch's own
    new = torch.where(ok, torch.stack([mu_bar, var + var / sums[3]]), run)  # running statistics
    return mean, v, var_kernel, mean_patch, torch.lerp(run, new, 0.1)


def time_us(fn, args, n: int, warmup: int = 200) -> float:
    for _ in range(warmup):
        fn(**args)
    start = time.perf_counter()
    for _ in range(n):
        fn(**args)
    return (time.perf_counter() - start) / n * 1e6


def time_compiled(x: dict, calls: int, options: Optional[dict] = None):
    """Seconds to compile the stand-in (the first call) and microseconds per compiled call, with inductor's
    ``options``; checks its results."""
    start = time.perf_counter()
    compiled = torch.compile(finalize, fullgraph=True, dynamic=False, options=options)
    compiled(**x)
    compile_s = time.perf_counter() - start
    us = time_us(compiled, x, calls)
    # the same function either way; compiled kernels may sum in another order: a few fp32 roundings
    # (u = 6e-8) of sums of <= 4 terms of size ~1-10
    for mine, eager in zip(compiled(**x), finalize(**x)):
        torch.testing.assert_close(mine, eager, rtol=1e-5, atol=1e-5)
    return compile_s, us


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='work_dirs/compile_finalize/compile_finalize.json')
    parser.add_argument('--calls', type=int, default=3000, help='timed calls per variant')
    parser.add_argument('--no-compile', action='store_true', help='time the eager stand-in only')
    parser.add_argument('--cpp-wrapper', action='store_true',
                        help="also time it compiled with inductor's C++ wrapper (cpp_wrapper=True)")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f'--calls must be >= 1, got {args.calls}')
    if args.cpp_wrapper and args.no_compile:
        parser.error('--cpp-wrapper times a compiled variant; it cannot go with --no-compile')
    torch.set_num_threads(1)  # the launch case's setting
    x = inputs(SHAPE['T'], SHAPE['C'], SHAPE['D'])
    out = dict(torch=torch.__version__, shape=SHAPE, calls=args.calls, eager_us=time_us(finalize, x, args.calls))
    if not args.no_compile:
        out['compile_s'], out['compiled_us'] = time_compiled(x, args.calls)
        if args.cpp_wrapper:  # inductor's C++ wrapper: the compiled call without its Python launcher
            torch.compiler.reset()
            out['compile_cpp_wrapper_s'], out['compiled_cpp_wrapper_us'] = time_compiled(
                x, args.calls, options=dict(cpp_wrapper=True))
    print(json.dumps(out, indent=1))
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == '__main__':
    main()
