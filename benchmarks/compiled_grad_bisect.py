"""Where compiled training blocks on the fla backend lose eager's gradients (issue 13, tests/test_ops_gpu.py's
xfail). One Mamba-2 130m-wide model of 3 layers, float32, one forward + backward, its gradients under each way
of running a block, against the eager fla blocks:

* `kernels, no compiler`: ops/compiled.py's kernels (the shifted-add conv, the reference norms, fla's scan as one
  custom op) called eagerly: are the kernels themselves right?
* `dynamo`, `aot_eager`, `inductor`: torch.compile with each backend: capture only; AOTAutograd's joint graph
  and partitioner without code generation; the whole compiler.
* `scan op alone`: the custom scan op under each backend, on random inputs, against its eager call.
* `fla bwd leaves its inputs`: whether fla's backward writes into a tensor it is given (the op says it does not).

    python benchmarks/compiled_grad_bisect.py [--length 149] [--out FILE]

Prints a table (worst relative gradient error per variant) and writes JSON. CUDA + fla only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gpu_common import RESULTS, device_info


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def lm_grads(mode: str, length: int, backend: str = "fla", conv: str = "compiled",
             inductor: dict | None = None) -> dict[str, torch.Tensor]:
    """`conv`: the compiled path's causal conv ('compiled': shifted adds; 'reference': the grouped conv);
    `inductor`: torch._inductor.config fields for this run."""
    import omnimamba.mamba2.model as mm
    from omnimamba.mamba2 import Mamba2LM, preset
    from omnimamba.ops import compiled, reference

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Mamba2LM(preset("mamba2-130m", n_layer=3), backend=backend).cuda().train()
    saved = mm._compiled_block
    compiled.training_kernels.cache_clear()
    if conv == "reference":
        kernels = compiled.training_kernels(128, 64, backend == "fla")
        kernels.causal_conv = reference.causal_conv
    patch = torch._inductor.config.patch(inductor or {})
    patch.__enter__()
    if mode != "eager":
        compile_with = {"kernels, no compiler": None, "dynamo": "eager", "aot_eager": "aot_eager",
                        "inductor": "inductor"}[mode]
        block = mm._eager_block if compile_with is None else torch.compile(mm._eager_block, backend=compile_with)
        mm._compiled_block = lambda: block
        model.backbone.compile_blocks(True)
    try:
        ids = torch.randint(0, 50000, (2, length + 1), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(0))
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    finally:
        mm._compiled_block = saved
        patch.__exit__(None, None, None)
        compiled.training_kernels.cache_clear()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def scan_inputs(length: int):
    g = torch.Generator("cuda").manual_seed(1)
    b, h, p, n = 2, 24, 64, 128

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).requires_grad_()

    return dict(x=r(b, length, h, p), dt=(torch.rand(b, length, h, device="cuda", generator=g) * 0.1 + 0.01
                                         ).requires_grad_(),
                A=(-torch.rand(h, device="cuda", generator=g) - 0.5).requires_grad_(),
                B=r(b, length, 1, n, scale=0.3), C=r(b, length, 1, n, scale=0.3), D=r(h))


def scan_grads(backend: str | None, length: int) -> dict[str, torch.Tensor]:
    from omnimamba.ops import fla

    route = fla.scan_backward(128, 64)

    def f(x, dt, A, B, C, D):
        y, final = fla.scan(x, dt, A, B, C, 64, D=D, verified=route == "fla-verified")
        return (y * torch.linspace(-1, 1, y.size(1), device=y.device)[None, :, None, None]).sum() + final.sum()

    torch._dynamo.reset()
    fn = f if backend is None else torch.compile(f, backend=backend)
    inputs = scan_inputs(length)
    fn(**inputs).backward()
    return {k: v.grad.detach().clone() for k, v in inputs.items()}


def bwd_leaves_inputs(length: int) -> dict[str, bool]:
    from omnimamba.ops import fla

    route = fla.scan_backward(128, 64)
    x = scan_inputs(length)
    with torch.no_grad():
        h = x["x"].size(2)
        q = x["C"].expand(-1, -1, h, -1).contiguous()
        k = x["B"].expand(-1, -1, h, -1).contiguous()
        xs, dt, A = x["x"].detach(), x["dt"].detach(), x["A"].detach()
        o, ht, g_cum = fla._scan_fwd(xs, dt, A, q, k, None, route == "fla-verified")
        do, dht = torch.randn_like(o), torch.randn_like(ht)
        given = dict(x=xs, dt=dt, A=A, q=q, k=k, g_cum=g_cum, do=do, dht=dht)
        before = {n: t.clone() for n, t in given.items()}
        fla._scan_bwd(xs, dt, A, q, k, g_cum, None, do, dht, route == "fla-verified")
        after = given
    return {n: bool(torch.equal(before[n], after[n])) for n in before}


def worst(grads: dict, truth: dict) -> tuple[list, float]:
    errs = sorted(((rel(grads[n], g), n) for n, g in truth.items() if g.abs().max() > 1e-8), reverse=True)
    return errs, errs[len(errs) // 2][0]


def variants(lengths: list[int]) -> list[dict]:
    """Inductor at each length, on each backend, with and without its stride padding, with the grouped conv;
    and the errors of the last layer's parameters (the first the backward reaches)."""
    rows = []
    runs = [dict(), dict(backend="reference"), dict(inductor={"comprehensive_padding": False}),
            dict(conv="reference"), dict(inductor={"shape_padding": False, "comprehensive_padding": False})]
    for length in lengths:
        for run in runs:
            backend = run.get("backend", "fla")
            truth = lm_grads("eager", length, backend=backend)
            errs, median = worst(lm_grads("inductor", length, **run), truth)
            last = {n: e for e, n in errs if ".layers.2." in n}
            rows.append({"what": "lm 3 layers, inductor", "length": length, **run, "worst": errs[0][0],
                         "worst_param": errs[0][1], "median": median, "last_layer": last})
            print(f"L={length:<4} {json.dumps(run):<70} worst {errs[0][0]:.2e} ({errs[0][1]}) median {median:.2e}",
                  flush=True)
            print("      last layer:", " ".join(f"{n.split('.', 3)[-1]} {e:.1e}" for n, e in last.items()), flush=True)
    return rows


def shapes(worst_n: int = 6) -> list[dict]:
    """tests/test_ops_gpu.py's Shapes model, both tasks in one forward: compiled (plain, checkpointed) and eager
    bf16 against the float32 eager gradients; the worst parameters of each."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_ops_gpu import shapes_run

    rows = []
    torch._dynamo.reset()
    truth_loss, truth = shapes_run(False, False)
    for name, args in (("compiled", (True, False)), ("compiled, checkpointed", (True, True)),
                       ("eager bf16", (False, False, 0.0, True)), ("compiled bf16", (True, False, 0.0, True))):
        loss, grads = shapes_run(*args)
        errs, median = worst(grads, truth)
        rows.append({"what": "shapes-small, both tasks", "mode": name, "loss": loss.item(), "truth_loss": truth_loss.item(),
                     "worst": [(e, n) for e, n in errs[:worst_n]], "median": median})
        print(f"shapes {name:<24} loss {loss.item():.6f} (eager fp32 {truth_loss.item():.6f}) median {median:.1e} worst "
              + " ".join(f"{n} {e:.1e}" for e, n in errs[:worst_n]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, nargs="+", default=[149, 128])
    ap.add_argument("--out", default=str(RESULTS / "compiled_grad_bisect.json"))
    ap.add_argument("--variants", action="store_true", help="inductor only, under the variants of `variants`")
    ap.add_argument("--shapes", action="store_true", help="the Shapes model of tests/test_ops_gpu.py instead")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.variants or args.shapes:
        rows = shapes() if args.shapes else variants(args.length)
        Path(args.out).write_text(json.dumps({"device": device_info(), "rows": rows}, indent=1))
        print("wrote", args.out)
        return
    rows = []
    for length in args.length:
        truth = lm_grads("eager", length)
        reference = lm_grads("eager", length, backend="reference")
        for mode in ("reference backend, eager", "kernels, no compiler", "dynamo", "aot_eager", "inductor"):
            grads = reference if mode.startswith("reference") else lm_grads(mode, length)
            errs = sorted(((rel(grads[n], g), n) for n, g in truth.items() if g.abs().max() > 1e-8), reverse=True)
            rows.append({"what": "lm 3 layers", "length": length, "mode": mode, "worst": errs[0][0],
                         "worst_param": errs[0][1], "median": errs[len(errs) // 2][0]})
            print(f"lm  L={length:<4} {mode:<26} worst {errs[0][0]:.2e} ({errs[0][1]})  median {errs[len(errs) // 2][0]:.2e}",
                  flush=True)
        truth = scan_grads(None, length)
        for backend in ("eager", "aot_eager", "inductor"):
            grads = scan_grads(backend, length)
            errs = {k: rel(grads[k], truth[k]) for k in truth}
            rows.append({"what": "scan op", "length": length, "mode": backend, "errors": errs})
            print(f"op  L={length:<4} {backend:<26} " + " ".join(f"{k} {e:.1e}" for k, e in errs.items()), flush=True)
        kept = bwd_leaves_inputs(length)
        rows.append({"what": "fla bwd leaves its inputs", "length": length, "kept": kept})
        print(f"bwd L={length:<4} inputs unchanged: {kept}", flush=True)
    Path(args.out).write_text(json.dumps({"device": device_info(), "rows": rows}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
