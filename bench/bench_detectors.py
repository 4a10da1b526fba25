"""Time and memory of evaluate.py's detectors on synthetic features (no checkpoint, no images).

Fits and scores each detector alone on N train rows of D-dim ReLU features around C class centres
(M test rows, 10,000 val rows at most), and prints its seconds and its peak memory above the outputs
every detector holds anyway (resident memory on a CPU, allocated GPU memory on CUDA). ODIN needs a
network and is left out.

    python bench/bench_detectors.py 200000,2048,1000           # RESULTS.md, detectors at scale
    python bench/bench_detectors.py 1281167,2048,1000,1000     # ImageNet-1K's train set (~16 GB held)
    python bench/bench_detectors.py 2000,64,10,300 --detectors msp,knn --device cuda
The flags after the shape are evaluate.py's detector flags (--detectors, --knn-k, --vim-dim, ...).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402  (the repository root, wherever this is run from)


def peak_memory_gb(device, reset=False):
    """Peak memory in GB: the GPU's allocations on CUDA, else this process's resident memory
    (Linux: reset=True restarts the peak from now)."""
    if device.type == 'cuda':
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    if reset:
        try:
            Path('/proc/self/clear_refs').write_text('5')
        except OSError:
            pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def synthetic_outputs(n, centres, W, b, generator, device):
    """n rows of ReLU features around random class centres and their logits, float32, filled in place."""
    labels, features = torch.randint(len(centres), (n,), generator=generator), torch.empty(n, centres.shape[1])
    logits = torch.empty(n, len(centres))
    for i in range(0, n, 8192):
        rows = slice(i, i + 8192)
        features[rows] = (centres[labels[rows]] + torch.randn(len(labels[rows]), centres.shape[1],
                                                              generator=generator)).clamp_min_(0)
        logits[rows] = features[rows] @ W.T.float() + b.float()
    return dict(features=features.to(device), logits=logits.to(device), labels=labels.to(device))


def bench(shape, args):
    """Fit + score of each detector on synthetic outputs of shape N,D,C[,M]; prints a table."""
    try:
        N, D, C, M = (int(v) for v in (shape.split(',') + ['10000'])[:4])
        assert min(N, D, C, M) >= 1 and N >= args.knn_k
    except (ValueError, AssertionError):
        evaluate.fail(f'pass N,D,C[,M], positive integers with N >= --knn-k, e.g. 200000,2048,1000; got {shape!r}')
    device, gen = torch.device(args.device), torch.Generator().manual_seed(0)
    # one-time costs come first, not inside a detector's row: the first LBFGS step of a process takes ~1 GB
    tiny = dict(features=torch.ones(2, 2), logits=torch.zeros(2, 2), labels=torch.arange(2))
    evaluate.fit(tiny, tiny, torch.eye(2), torch.zeros(2), argparse.Namespace(detectors=['tempscale']))
    memory_start = peak_memory_gb(device, reset=True)
    centres = 2 * torch.randn(C, D, generator=gen)
    W, b = torch.randn(C, D, generator=gen, dtype=torch.float64) / D ** 0.5, 0.1 * torch.randn(C, generator=gen,
                                                                                            dtype=torch.float64)
    t0 = time.time()
    train, val, test = (synthetic_outputs(n, centres, W, b, gen, device) for n in (N, min(N, 10000), M))
    W, b = W.to(device), b.to(device)
    z, h = test['logits'].double(), test['features'].double()
    features_gb = N * D * 4 / 2 ** 30
    data_gb = peak_memory_gb(device, reset=True) - memory_start  # every row holds these: train/val/test outputs
    print(f'synthetic outputs: train {N:,} x {D} features ({features_gb:.2f} GB float32) + {C} logits, val '
          f'{len(val["labels"]):,}, test {M:,}; device {device}; {data_gb:.2f} GB held in all ({time.time() - t0:.0f} s)')
    print('| detector | fit s | score s | peak GB above the held outputs |\n|---|---|---|---|')
    worst = 0.0
    for det in [d for d in args.detectors if d != 'odin']:
        peak_memory_gb(device, reset=True)
        t0 = time.time()
        stats = evaluate.fit(train, val, W, b, argparse.Namespace(**dict(vars(args), detectors=[det])))
        t1 = time.time()
        evaluate.SCORES[det](z, h, stats, args)
        t2 = time.time()
        extra = max(0.0, peak_memory_gb(device) - memory_start - data_gb)
        worst = max(worst, extra)
        print(f'| {det} | {t1 - t0:.2f} | {t2 - t1:.2f} | {extra:.2f} |', flush=True)
    print(f'peak = held outputs + {worst:.2f} GB = {(data_gb + worst) / features_gb:.2f} x the train feature array')


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if not argv or argv[0].startswith('-'):
        evaluate.fail('pass the shape N,D,C[,M] first (train rows, dims, classes, test rows), e.g. 200000,2048,1000')
    bench(argv[0], evaluate.get_args(['synthetic'] + argv[1:]))


if __name__ == '__main__':
    main()
