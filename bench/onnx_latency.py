"""CPU inference latency on onnxruntime beside PyTorch, for the dense (masked) and the compact model.

    python bench/onnx_latency.py [--archs lenet,vgg16,resnet18] [--width 16] [--batch 64] [--threads 1] [--reps 5]

Cases: the demo's LeNet w=4 (irregular at the demo's ratios: nothing to remove, so compact ~ dense)
and VGG-16 / ResNet-18 at ``--width`` on 32x32 inputs, filter-pruned at 75 % per conv with random
weights and BN statistics (``bench/compact.py``'s models). For each, four models: PyTorch dense,
PyTorch compact, and the ONNX graphs of both (``formats.onnx_graph``) on an onnxruntime CPU
session with the same number of threads. Each is checked against the masked model (1e-5
relative) before timing; all are timed in turns in this one process (median of ``--reps``).
Printed: latency, speed-up over PyTorch dense, and onnxruntime / PyTorch for the same model.
Needs onnx, onnxscript and onnxruntime.
"""
import argparse
import os
import time

import torch

from benchutil import machine, time_many  # also puts the repo root on sys.path
import admm  # noqa: E402
from deploy import channels  # noqa: E402
from deploy import exportfile  # noqa: E402
from deploy import formats
from compact import pruned_model  # noqa: E402  (bench/compact.py: random-weight filter-pruned models)
from config import load_config  # noqa: E402
from data import INFO  # noqa: E402
from models import model_from_config  # noqa: E402


def demo_lenet():
    """The demo's LeNet w=4 with random weights, irregular-pruned at configs/demo.yaml's ratios."""
    torch.manual_seed(0)
    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/demo.yaml"),
                      ["device=cpu"])
    model = model_from_config(cfg, INFO["demo"], "cpu")
    admm.hard_prune(admm.prunable_weights(model), admm.resolve_ratios(model, cfg["prune"]["prune_ratios"]), "irregular")
    return model.eval(), cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="lenet,vgg16,resnet18")
    p.add_argument("--width", type=int, default=16, help="width of VGG-16 and ResNet-18 (LeNet: the demo's 4)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch and of onnxruntime (default 1)")
    p.add_argument("--reps", type=int, default=5, help="timed runs per model (the median is kept), after one warm-up")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import onnxruntime
    except ImportError:
        raise SystemExit("this benchmark needs onnxruntime, onnx and onnxscript: pip install onnx onnxscript onnxruntime")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{machine()}, onnxruntime {onnxruntime.__version__} (load average {load:.2f}); batch {args.batch}, "
          f"median of {args.reps} after 1 warm-up")
    print("speed-up: PyTorch dense's time over the model's; ort / torch: onnxruntime's time over PyTorch's, same model")
    print(f"{'arch':9} {'pruning':15} {'model':8} {'PyTorch':>9} {'onnxruntime':>12} {'ort / torch':>12} "
          f"{'speed-up torch':>15} {'speed-up ort':>13}")
    t_start = time.time()
    for arch in args.archs.split(","):
        masked, cfg = demo_lenet() if arch == "lenet" else pruned_model(arch, args.width, "filter", 0.75)
        scheme = "irregular demo" if arch == "lenet" else "filter 75%"
        shape = exportfile.input_shape(cfg)
        x = torch.rand(args.batch, *shape, generator=torch.Generator().manual_seed(0))
        torch_models = {"dense": masked, "compact": channels.compact_model(masked, shape).eval()}
        models = {}
        for name, m in torch_models.items():
            models[f"torch {name}"] = m
            models[f"ort {name}"] = formats.OnnxRuntimeModel(
                formats.onnx_graph(m, shape).SerializeToString(), args.threads)
        with torch.no_grad():
            ref = masked(x[:8])
            for name, m in models.items():  # a fast but wrong model would make a false figure
                err = ((m(x[:8]) - ref).abs().max() / ref.abs().max()).item()
                assert err <= 1e-5, f"{arch} {name}: outputs differ from the masked model ({err:.2e})"
            t = time_many({k: (lambda m=m: m(x)) for k, m in models.items()}, warmup=1, reps=args.reps)
        for name in torch_models:
            pt, ort = t[f"torch {name}"], t[f"ort {name}"]
            print(f"{arch:9} {scheme:15} {name:8} {pt * 1e3:7.1f}ms {ort * 1e3:10.1f}ms {ort / pt:11.2f}x "
                  f"{t['torch dense'] / pt:14.2f}x {t['torch dense'] / ort:12.2f}x", flush=True)
    print(f"total time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
