"""Score checkpoints on the OpenOOD v1.5 benchmark with 14 post-hoc OOD detectors.

Protocol: OpenOOD v1.5 (Zhang et al., arXiv 2306.09301): the ID test set against near-OOD and far-OOD
sets, OOD = positive class, FPR@95 / AUROC / AUPR-In / AUPR-Out / ACC in %, `near` and `far` = unweighted
means, several runs (seeds) = mean +- std. The network runs once per set, in float32 as OpenOOD does
(--bf16 for speed); every detector but ODIN (input gradients) is scored from the cached logits and
penultimate features, with statistics fitted only for the detectors asked for.

    python evaluate.py runs/digits_ce_s0 runs/digits_ce_s1 runs/digits_ce_s2 --out results/digits_ce
    python evaluate.py baseline=runs/ce_s0,runs/ce_s1 sio=runs/sio_s0,runs/sio_s1 --detectors msp,ebo,knn
    python evaluate.py runs/c10_sio_s0 --near tin=data/tin --cache cache/ --plots plots/   # CIFAR-10
    python evaluate.py runs/c10_sio_s0 --aps sio --aps-ood data/c100_heldout   # the SIO code's search
    python evaluate.py openood:results/cifar10_resnet18_32x32_base_e100_lr0.1_default --dataset cifar10 \\
        --openood-root data --aps openood      # OpenOOD's released checkpoints, lists and search
    python evaluate.py torchvision:resnet50 --dataset imagenet --openood-root data --aps openood
    torchrun --nproc_per_node=4 evaluate.py runs/c100_sio_s0    # rank-sharded network passes

Detectors: msp mls ebo tempscale odin gen klm react ash dice mds rmds knn vim (OpenOOD v1.5's).
"""
import argparse
import csv, fcntl, hashlib, json, math, os, re, shlex, signal, sys, threading, time
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
if __name__ == '__main__':  # Ctrl-C while the libraries below load: one line, and out at once (an exception
    # raised inside a C extension's import would surface as that library's ImportError instead)
    signal.signal(signal.SIGINT, lambda *_: (print('\ninterrupted while starting: nothing was written',
                                                   file=sys.stderr, flush=True), os._exit(130)))

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from sklearn import metrics as skm
from tqdm import tqdm

DETECTORS = 'msp mls ebo tempscale odin gen klm react ash dice mds rmds knn vim'.split()
TRAIN_DETECTORS = {'dice', 'mds', 'rmds', 'knn', 'vim'}  # fitted on the ID train outputs
METRICS = ['FPR95', 'AUROC', 'AUPR_IN', 'AUPR_OUT', 'ACC', 'FPR95_ID']
METRIC_TITLES = dict(zip(METRICS, ['FPR@95', 'AUROC', 'AUPR-In', 'AUPR-Out', 'ACC', 'FPR95(ID+)']))
# OpenOOD v1.5's benchmarks: OOD sets named as their lists test_<name>.txt, the ID classes and
# the validation OOD list val_<name>.txt of its parameter search
CIFAR_FAR = ['mnist', 'svhn', 'texture', 'places365']
IMAGENET_OOD = dict(near=['ssb_hard', 'ninco'], far=['inaturalist', 'textures', 'openimage_o'], val_ood='openimage_o')
BENCHMARKS = {'digits': dict(near=['digits6-9'], far=['china', 'flower']),
              'cifar10': dict(near=['cifar100', 'tin'], far=CIFAR_FAR, classes=10, val_ood='tin'),
              'cifar100': dict(near=['cifar10', 'tin'], far=CIFAR_FAR, classes=100, val_ood='tin'),
              'imagenet200': dict(IMAGENET_OOD, classes=200), 'imagenet': dict(IMAGENET_OOD, classes=1000)}
IMAGENETS = ('imagenet200', 'imagenet')
RESERVED = ('id', 'train', 'val', 'aps_ood', 'near', 'far', 'other-classes')  # names of splits and rows


# ------------------------------------------------------------------------------------------------
# The method: detectors fitted once from ID train / val outputs, then score = f(logits z, features h),
# higher = more in-distribution (p softmax, W/b the last layer); OpenOOD's parameter search; metrics.

def energy(z):
    return torch.logsumexp(z, dim=1)

CHUNK_VALUES = 2 ** 24  # float64 values per chunk when streaming over train features (128 MB)

def train_moments(h, y, num_classes, with_scatter=True, rows=None):
    """float32 h in chunks -> float64 (mean, class means, counts, scatter sum_i (h_i - mean)(h_i - mean)^T or None)."""
    rows = rows or max(1, CHUNK_VALUES // h.shape[1])
    shift = h[:rows].double().mean(0)  # products of shifted rows: the scatter keeps its digits however large the mean
    sums = torch.zeros(num_classes, h.shape[1], dtype=torch.float64, device=h.device)
    gram = torch.zeros(h.shape[1], h.shape[1], dtype=torch.float64, device=h.device) if with_scatter else None
    for i in range(0, len(h), rows):
        x = h[i:i + rows].double() - shift
        sums.index_add_(0, y[i:i + rows], x)
        if with_scatter:
            gram += x.T @ x
    counts = torch.bincount(y, minlength=num_classes).double()
    mean_shifted = sums.sum(0) / len(h)
    scatter = gram - len(h) * torch.outer(mean_shifted, mean_shifted) if with_scatter else None
    return mean_shifted + shift, sums / counts[:, None] + shift, counts, scatter

def fit(train, val, W, b, args):
    """The statistics the asked detectors need, from ID train (None when none needs it) and val outputs, in float64."""
    detectors, z_val, y_val, stats = set(args.detectors), val['logits'].double(), val['labels'], dict(W=W, b=b)
    C, d = W.shape
    if 'tempscale' in detectors:
        # T fitted on val by NLL, as OpenOOD (T from 1.5, LBFGS lr 0.01, 50 iterations). On a val set the model
        # classifies perfectly the NLL keeps falling as T -> 0; the fixed budget keeps T finite, so it is kept.
        temperature = torch.full((), 1.5, dtype=torch.float64, device=z_val.device, requires_grad=True)
        opt = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)

        def nll():
            opt.zero_grad()
            loss = F.cross_entropy(z_val / temperature, y_val)
            loss.backward()
            return loss
        opt.step(nll)
        stats['temperature'] = temperature.item()
    if 'klm' in detectors:  # mean softmax of the val samples predicted as each class (never predicted: left out)
        p_val, pred_val = F.softmax(z_val, 1), z_val.argmax(1)
        stats['klm_means'] = torch.stack([p_val[pred_val == c].mean(0) for c in range(C) if (pred_val == c).any()])
    if 'react' in detectors:  # its clip, a percentile of all ID val activations, is taken when scoring (--aps)
        stats['react_activations'] = val['features'].float().cpu().numpy()
    h_tr, z_tr, y_tr = (train['features'], train['logits'], train['labels']) if train else (None,) * 3
    if detectors & {'dice', 'mds', 'rmds', 'vim'}:
        mean, class_means, counts, scatter = train_moments(h_tr, y_tr, C, bool(detectors & {'mds', 'rmds', 'vim'}))
    if 'dice' in detectors:  # keep the weights whose contribution (mean train h * W) is in the top 10%
        contrib = mean[None, :] * W
        stats['dice_W'] = W * (contrib > float(np.percentile(contrib.cpu().numpy(), args.dice_percentile)))
    if detectors & {'mds', 'rmds'}:  # class means and the tied covariance = total minus between-class scatter
        between = (class_means - mean).T @ ((class_means - mean) * counts[:, None])
        stats['mds_means'] = class_means
        stats['mds_prec'] = torch.linalg.pinv((scatter - between) / len(h_tr), hermitian=True)
    if 'rmds' in detectors:  # the class-agnostic Gaussian
        stats['rmds_mean'], stats['rmds_prec'] = mean, torch.linalg.pinv(scatter / len(h_tr), hermitian=True)
    if 'knn' in detectors:  # the bank is the train features themselves, normalised block by block when scoring
        stats['knn_bank'] = h_tr  # --knn-k <= the train size: checked before any network pass
    if 'vim' in detectors:  # origin u = -pinv(W) b; residual space = the eigenvectors outside the top-D principal
        # subspace of the covariance of h - u around 0 (OpenOOD: EmpiricalCovariance(assume_centered=True))
        D = args.vim_dim or (256 if d > 256 else d // 2)
        if not 0 < D < d:
            fail(f'--vim-dim {D} must be between 1 and {d - 1} (the feature size is {d})')
        u = -torch.linalg.pinv(W) @ b
        eigvals, eigvecs = torch.linalg.eigh(scatter / len(h_tr) + torch.outer(mean - u, mean - u))
        residual_space = eigvecs[:, torch.argsort(eigvals, descending=True)[D:]]
        rows = max(1, CHUNK_VALUES // d)
        residual_norm = sum(torch.linalg.norm((h_tr[i:i + rows].double() - u) @ residual_space, dim=1).sum()
                            for i in range(0, len(h_tr), rows))
        max_logit = sum(z_tr[i:i + rows].double().max(1).values.sum() for i in range(0, len(z_tr), rows))
        stats.update(vim_u=u, vim_ns=residual_space, vim_alpha=(max_logit / residual_norm).item())
    return stats

def mahalanobis(h, means, prec):  # (N, C) squared distances to each mean: h'Ph - 2h'Pmu + mu'Pmu, no (N, C, d) tensor
    hp = h @ prec
    return (hp * h).sum(1, keepdim=True) - 2 * hp @ means.T + ((means @ prec) * means).sum(1)[None, :]

def klm_score(p, class_means):  # -min_c KL(p || m_c) = -(sum p log p - max_c p . log m_c), without an (N, C, C) tensor
    return -((p * p.clamp_min(1e-30).log()).sum(1) - (p @ class_means.clamp_min(1e-30).log().T).max(1).values)

def knn_score(h, bank, k, block=2 ** 25):
    """-distance to the k-th nearest normalised train feature: a running top-k over blocks of `block` similarities."""
    q = F.normalize(h.float(), dim=1)
    n_query = max(1, min(len(q), 4096, block // k))  # ImageNet-1K at once: 50k x 1.28M = 256 GB
    n_bank = max(k, block // n_query)
    kth = []
    for i in range(0, len(q), n_query):
        top = None
        for j in range(0, len(bank), n_bank):
            sims = q[i:i + n_query] @ F.normalize(bank[j:j + n_bank].float(), dim=1).T
            top = sims if top is None else torch.cat([top, sims], 1)
            top = top.topk(min(k, top.shape[1]), dim=1).values
        kth.append(top[:, k - 1])
    kth_sim = torch.cat(kth) if kth else q.new_zeros(0)
    return -(2 - 2 * kth_sim.double()).clamp_min(0).sqrt()  # |a - b|^2 = 2 - 2 a.b for unit vectors

def ash_b(h, percentile):  # ASH-B: keep the top (100-p)% activations of each sample, all set to sum(h)/k; the rest 0
    k = h.shape[1] - int(round(h.shape[1] * percentile / 100))
    top = h.topk(k, dim=1).indices
    return torch.zeros_like(h).scatter_(1, top, (h.sum(1, keepdim=True) / k).expand(-1, k))

def react_clip(stats, percentile):  # ReAct's clip: that percentile of the ID val activations (np.percentile as OpenOOD)
    return stats.setdefault(f'react_clip_{percentile}', float(np.percentile(stats['react_activations'], percentile)))

def gen_score(p, gamma):  # GEN: -sum over the top-M classes of p^g (1-p)^g, M = min(100, C)
    p = p.sort(1).values[:, -min(100, p.shape[1]):]
    return -(p ** gamma * (1 - p) ** gamma).sum(1)

SCORES = {
    'msp': lambda z, h, s, a: F.softmax(z, 1).max(1).values,
    'mls': lambda z, h, s, a: z.max(1).values,
    'ebo': lambda z, h, s, a: a.ebo_temperature * energy(z / a.ebo_temperature),  # T = 1 unless set or searched
    'tempscale': lambda z, h, s, a: F.softmax(z / s['temperature'], 1).max(1).values,
    'gen': lambda z, h, s, a: gen_score(F.softmax(z, 1), a.gen_gamma),
    'klm': lambda z, h, s, a: klm_score(F.softmax(z, 1), s['klm_means']),
    'react': lambda z, h, s, a: energy(h.clamp(max=react_clip(s, a.react_percentile)) @ s['W'].T + s['b']),
    'ash': lambda z, h, s, a: energy(ash_b(h, a.ash_percentile) @ s['W'].T + s['b']),
    'dice': lambda z, h, s, a: energy(h @ s['dice_W'].T + s['b']),
    'mds': lambda z, h, s, a: -mahalanobis(h, s['mds_means'], s['mds_prec']).min(1).values,
    'rmds': lambda z, h, s, a: (-mahalanobis(h, s['mds_means'], s['mds_prec'])
                                + mahalanobis(h, s['rmds_mean'][None], s['rmds_prec'])).max(1).values,
    'knn': lambda z, h, s, a: knn_score(h, s['knn_bank'], a.knn_k),
    'vim': lambda z, h, s, a: energy(z) - s['vim_alpha'] * torch.linalg.norm((h - s['vim_u']) @ s['vim_ns'], dim=1),
}

# --aps sio / val: the SIO code's postprocessor_sweep lists (knn: K 50 only); openood: v1.5's sweeps (configs/
# postprocessors/*.yml at tag v1.5). Faithful to v1.5, ViM's dim sweep changes nothing: v1.5 fitted the residual
# space once at the default dim and set_hyperparam changed a number no score reads (fixed upstream in 2025), so
# every candidate ties and the first, 256, is kept; here too it is fitted once at --vim-dim (fixed: --vim-dim 1000).
APS_GRIDS = {'ebo': {'ebo_temperature': [1.0, 10.0, 100.0, 1000.0]},
             'odin': {'odin_temperature': [1.0, 10.0, 100.0, 1000.0], 'odin_eps': [0.0014, 0.0028]},
             'knn': {'knn_k': [50]}}
APS_OPENOOD = dict(APS_GRIDS, knn={'knn_k': [50, 100, 200, 500, 1000]}, vim={'vim_dim': [256, 1000]},
                   react={'react_percentile': [85, 90, 95, 99]}, ash={'ash_percentile': [65, 70, 75, 80, 85, 90, 95]})

def aps_search(det, args, id_scores, ood_scores, train_rows):
    """Every setting a of det's grid -> (a, record) with the best validation AUROC of id_scores(a) vs ood_scores(a)."""
    grid = (APS_OPENOOD if args.aps == 'openood' else APS_GRIDS)[det]
    combos = [{}]
    for name in list(grid)[::-1] if args.aps == 'openood' else grid:  # v1.5's generator: the last key outermost
        combos = [dict(combo, **{name: value}) for combo in combos for value in grid[name]]
    fixed_id, best = id_scores(args) if args.aps == 'sio' else None, None  # sio: ID once at the flags' setting (v1.0)
    for setting in [{name: c[name] for name in grid} for c in combos if c.get('knn_k', 0) <= train_rows]:
        a = argparse.Namespace(**{**vars(args), **setting})  # K above the train size: faiss finds no K-th
        auroc = ood_metrics(fixed_id if fixed_id is not None else id_scores(a), ood_scores(a))['AUROC']
        # ties: the last setting for sio / val (OpenOOD's main.py pipeline, which the SIO code ran), the
        # first for openood (v1.5's Evaluator takes a setting only when it beats the best so far)
        if best is None or auroc > best[0] or auroc == best[0] and args.aps != 'openood':
            best = (auroc, a, setting)
    return best[1], dict(best[2], val_auroc=round(best[0], 4))

def ood_metrics(id_scores, ood_scores):  # OpenOOD v1.5's metrics in %: OOD the positive class, scores higher = more ID
    is_ood = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    s = np.r_[id_scores, ood_scores].astype(np.float64)
    fpr, tpr, _ = skm.roc_curve(is_ood, -s)
    fpr_id, tpr_id, _ = skm.roc_curve(1 - is_ood, s)  # classic: OOD accepted when 95% of ID is accepted
    precision_in, recall_in, _ = skm.precision_recall_curve(1 - is_ood, s)
    precision_out, recall_out, _ = skm.precision_recall_curve(is_ood, -s)
    return dict(FPR95=100 * fpr[np.argmax(tpr >= 0.95)], AUROC=100 * skm.roc_auc_score(is_ood, -s),
                AUPR_IN=100 * skm.auc(recall_in, precision_in), AUPR_OUT=100 * skm.auc(recall_out, precision_out),
                FPR95_ID=100 * fpr_id[np.argmax(tpr_id >= 0.95)])

def run_table(scores, groups, acc):  # {dataset | near | far: {metric: value}} for one run and one detector
    table = {name: dict(ood_metrics(scores['id'], scores[name]), ACC=acc) for name in groups}
    for group in ('near', 'far'):
        names = [n for n, g in groups.items() if g == group]
        if names:
            table[group] = {m: float(np.mean([table[n][m] for n in names])) for m in METRICS}
    return table

def aggregate(tables):  # mean and std over runs of {dataset: {metric: value}} -> {dataset: {metric, metric_std}}
    return {row: {m + suffix: float(f([t[row][m] for t in tables])) for m in METRICS
                  for suffix, f in (('', np.mean), ('_std', np.std))} for row in tables[0]}


# ------------------------------------------------------------------------------------------------
# Scoring, in named steps: prepare (every input, once), claim_outputs, network_outputs (one cached
# pass per split), odin_all (ODIN's own passes), score_run (fit, search, score), report.

def prepare(args, device, rank):  # every input (runs, ID and OOD sets, memory) checked before any output is touched
    settings = {name: [run for spec in specs for run in load_runs(spec, args)] for name, specs in args.runs.items()}
    runs = [run for group in settings.values() for run in group]
    names, digests = [run['name'] for run in runs], [run['digest'] for run in runs]
    if len(set(names)) != len(names):
        fail(f'two runs share the name {max(names, key=names.count)!r} (their folder or file stem): rename one')
    if len(set(digests)) != len(digests):  # a run, a link to it or a copy of it: a seed counted twice
        twice = [run['name'] for run in runs if digests.count(run['digest']) > 1]
        fail(f'runs {" and ".join(twice[:2])} are one checkpoint (a link or a copy?): give each run once')
    dataset = args.dataset or runs[0]['dataset']
    for run in runs:  # a folder run may be scored on its moved folder (--dataset folder:NEW) or on ImageNet lists
        moved = run['dataset'].startswith('folder:') and (dataset.startswith('folder:') or dataset in IMAGENETS)
        if run['dataset'] != dataset and not (args.dataset and moved):
            fail(f"{run['name']} was trained on {run['dataset']}, not {dataset}: "
                 + (f"pass --dataset {run['dataset']}" if args.dataset else 'evaluate one dataset at a time'))
        if dataset.startswith('folder:') and (run.get('classes'), run['image_size']) != (runs[0].get('classes'),
                                                                                        runs[0]['image_size']):
            fail(f"runs were trained on different classes or image sizes ({run['name']} vs {names[0]}): evaluate "
                 f"each in a command of its own")
        if not all(torch.isfinite(v).all() for v in run['model'].values() if v.is_floating_point()):
            fail(f"{run['name']} holds NaN or infinite weights (a diverged run?): pass a checkpoint with finite ones")
    data = load_data(args, dataset, runs)
    for run in runs:
        run.update(mean=run['mean'] or data['mean'], std=run['std'] or data['std'])  # foreign runs: the set's
        if run['num_classes'] != len(data['classes']):
            fail(f"{run['name']} has {run['num_classes']} classes but --dataset {dataset} has "
                 f"{len(data['classes'])}: evaluate it on the dataset it was trained on")
        d = run['model']['fc.weight'].shape[1]
        if 'vim' in args.detectors and args.vim_dim is not None and not 1 <= args.vim_dim < d:
            fail(f"--vim-dim {args.vim_dim} must be between 1 and {d - 1} (the feature size of {run['name']} is {d})")
        if 'ash' in args.detectors and round(d * args.ash_percentile / 100) == d:
            fail(f"--ash-percentile {args.ash_percentile} keeps none of the {d} features of {run['name']}: pass a "
                 f"smaller one")
    rows = {split: len(labels) for split, (_, labels) in data['splits'].items()}
    k = max(args.knn_k, 50 if args.aps else 0)  # every --aps grid starts at K 50
    if 'knn' in args.detectors and k > rows['train']:
        fail(f"knn needs {k} neighbours (--knn-k {args.knn_k}{', --aps' * (k > args.knn_k)}) but there are "
             f"{rows['train']} ID train features: pass a smaller --knn-k, or leave knn out of --detectors")
    train_rows = rows['train'] * needs_train(args)  # held only for the detectors fitted on them
    width = 4 * max(sum(run['model']['fc.weight'].shape) for run in runs)  # float32 logits + features
    fix = 'score fewer detectors (dice, mds, rmds, knn and vim hold the train outputs), or use a bigger machine'
    held = sum(rows.values()) - rows['train'] + train_rows
    check_memory(held * width, f'holding the logits and features of {held:,} images', fix, 'cpu')
    if device.type == 'cuda':  # where the detectors are fitted
        check_memory((train_rows + rows['val']) * width, 'the ID train and val outputs', fix, str(device))
    if rank == 0:
        print(f"{dataset}: ID test {rows['id']:,}, " + ', '.join(f'{n} ({g}) {rows[n]:,}'
                                                                 for n, g in data['groups'].items()))
    return settings, data

def needs_train(args):
    return bool(TRAIN_DETECTORS & set(args.detectors))

def claim_outputs(args, settings, data, step):
    """--out, --plots and --cache by one rule (none is, holds or lies in an input); step: check, cache or results."""
    inputs = [(f"run {run['name']}", run['folder']) for runs in settings.values() for run in runs] + [
        (f'--{group} {name} folder', path) for group in ('near', 'far') for name, path in getattr(args, group)] + [
        ('--aps-ood folder', args.aps_ood), ('--openood-root folder', args.openood_root),
        ('--dataset folder', data['dataset'][len('folder:'):] if data['dataset'].startswith('folder:') else None)]
    skip = {'runs', 'out', 'plots', 'cache', 'overwrite', 'device', 'batch_size', 'workers', 'strict'}
    made_by = json.loads(json.dumps(dict(  # what the results depend on, as the manifest holds it
        {'--' + k.replace('_', '-'): v for k, v in vars(args).items() if k not in skip}, dataset=data['dataset'],
        runs={s: [run['source'] for run in runs] for s, runs in settings.items()})))
    for flag, folder, made in (('--out', args.out, 'results'), ('--plots', args.plots, 'plots')):
        if folder and step != 'cache':
            claim(folder, flag, 'evaluate.py' + ' plots' * (made == 'plots'), made_by, args.overwrite, 'unfinished',
                  f'the {made} of an earlier evaluation', f'pass --overwrite to replace them, or another {flag}',
                  inputs, step == 'check')
    if args.cache and step != 'results':  # entries keyed by their content: any evaluation continues it
        claim(args.cache, '--cache', 'evaluate.py cache', None, False, True, 'a cache', 'pass another --cache', inputs,
              step == 'check')

def network_outputs(run, data, args, device, rank, world):
    """Logits and features of each split the detectors need, cached by weights, content, transform and precision."""
    outputs, model = {}, None
    for split, (images, labels) in data['splits'].items():
        if split == 'train' and not needs_train(args):
            continue
        file = Path(args.cache) / run['name'] / f'{split}.npz' if args.cache else None
        key = file and (f"{run['digest']}:{content_key(data, split)}:{data['pre_size']}/{data['size']}:{run['mean']}"
                        f"{run['std']}{run['image_size']}:{'bf16' if args.bf16 else 'fp32'}")
        outputs[split] = read_cache(file, key, len(labels)) if file else None
        if outputs[split] is None:
            model = model or build_model(run, device)
            logits, features = forward_all(model, images, run, data, device, args, rank, world, split)
            if not (np.isfinite(logits).all() and np.isfinite(features).all()):
                fail(f"{run['name']} gives non-finite logits or features on {split} (NaN or overflowing weights?): "
                     f"pass a checkpoint whose outputs are finite")
            outputs[split] = dict(logits=logits, features=features, labels=np.asarray(labels))
        if file and rank == 0 and 'source' not in outputs[split]:
            file.parent.mkdir(exist_ok=True)
            write_atomic(file, lambda tmp: save_npz(tmp, source=key, **outputs[split]))
            STATUS['kept'] = f'{args.cache} keeps the network outputs computed so far'
    return outputs, model

def content_key(data, split):  # a split's pixels, files' bytes, or for OpenOOD's lists (1.28M files) the list itself
    if split not in data['keys']:
        images, labels = data['splits'][split]
        digest = hashlib.sha256(np.ascontiguousarray(labels).tobytes())
        if isinstance(images, np.ndarray):
            digest.update(f'{images.dtype}{images.shape}'.encode() + memoryview(np.ascontiguousarray(images)).cast('B'))
        for file in images if isinstance(images, list) else []:
            digest.update(file.encode() if isinstance(images, ImageList) else Path(file).read_bytes())
        data['keys'][split] = digest.hexdigest()[:16]
    return data['keys'][split]

def read_cache(file, key, rows):  # a split's outputs from the cache when made under key, else None (computed again)
    try:
        with np.load(file) as cached:
            if str(cached['source']) == key and len(cached['labels']) == rows:
                return dict(source=key, **{k: cached[k] for k in ('logits', 'features', 'labels')})
    except FileNotFoundError:
        pass
    except Exception as e:  # damaged outside this script (BadZipFile, a missing key...): computed again
        print(f'note: cache {file} is unreadable ({type(e).__name__}); computing it again', file=sys.stderr)

def save_npz(path, **arrays):
    with open(path, 'wb') as f:  # a file object: np.savez would add .npz to a temporary name
        np.savez(f, **arrays)

def image_batches(images, data, idx, args):  # uint8 (n, 3, S, S) batches: an array's, or files read by workers
    if isinstance(images, list):
        items = [(images[i], data['pre_size'], data['size']) for i in idx]
        workers = min(args.workers, len(idx) // args.batch_size)
        yield from torch.utils.data.DataLoader(items, args.batch_size, collate_fn=read_batch, num_workers=workers,
                                               worker_init_fn=ignore_interrupts)
    for i in range(0, len(idx), args.batch_size) if isinstance(images, np.ndarray) else []:
        yield torch.from_numpy(images[idx[i:i + args.batch_size]]).permute(0, 3, 1, 2)

@torch.no_grad()
def forward_all(model, images, run, data, device, args, rank=0, world=1, split=''):
    """One pass over a split -> float32 numpy (logits, features), sharded across ranks. float32 by default, as
    OpenOOD scores: bf16 moves AUROC and FPR@95 (README); --bf16 opts in for speed."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    idx = np.arange(rank, len(images), world)
    # filled in place: at ImageNet-1K the train features alone are 1.28M x 2048 float32 (10 GB)
    logits = np.empty((len(idx), model.fc.out_features), dtype=np.float32)
    features, done = np.empty((len(idx), model.feature_dim), dtype=np.float32), 0
    for x in tqdm(image_batches(images, data, idx, args), desc=f"{run['name']}/{split}", leave=False, disable=rank != 0,
                  total=math.ceil(len(idx) / args.batch_size)):
        with autocast:
            z, h = model(normalize(x.to(device), run['mean'], run['std'], run['image_size']), features=True)
        logits[done:done + len(x)], features[done:done + len(x)] = z.float().cpu().numpy(), h.float().cpu().numpy()
        done += len(x)
    return gather(logits, world), gather(features, world)

def gather(array, world):  # re-interleave rank-sharded rows (rank r holds rows r, r+world, ...) into the full array
    if world == 1:
        return array
    parts = [None] * world
    dist.all_gather_object(parts, array)
    out = np.empty((sum(len(p) for p in parts),) + array.shape[1:], dtype=array.dtype)
    for rank, part in enumerate(parts):
        out[rank::world] = part
    return out

def odin_all(run, model, data, args, device, rank, world):
    """ODIN (Liang et al. 2018), max softmax(f(x')/T), x' = x - eps * sign(grad_x CE(f(x)/T, argmax)), on the ID
    test and OOD sets after its --aps search, every rank taking part -> ({split: scores}, record)."""
    if 'odin' not in args.detectors:
        return {}, None
    model, odin, pick, setting = model or build_model(run, device), {}, None, args

    def run_odin(split, a):
        scores, images = [], data['splits'][split][0]
        for x in tqdm(image_batches(images, data, np.arange(rank, len(images), world), args), desc='odin', leave=False,
                      disable=rank != 0):
            x = normalize(x.to(device), run['mean'], run['std'], run['image_size']).requires_grad_(True)
            logits = model(x)
            F.cross_entropy(logits / a.odin_temperature, logits.argmax(1)).backward()
            # OpenOOD: sign with 0 -> +1, and the step in pixel units becomes eps/std in normalised units
            step = torch.where(x.grad >= 0, 1.0, -1.0) / torch.tensor(run['std'], device=device).view(1, 3, 1, 1)
            with torch.no_grad():
                scores.append(F.softmax(model(x - a.odin_eps * step) / a.odin_temperature, 1).max(1).values.cpu())
        return gather(torch.cat(scores).numpy() if scores else np.zeros(0, np.float32), world)
    if args.aps == 'sio':  # the ID test side stays at the default setting, for the search and the table
        odin['id'] = run_odin('id', args)
    if args.aps:
        setting, pick = aps_search('odin', args, lambda a: odin['id'] if args.aps == 'sio' else run_odin('val', a),
                                   lambda a: run_odin('aps_ood', a), math.inf)
    odin.update({split: run_odin(split, setting) for split in ['id'] + data['oods'] if split not in odin})
    return odin, pick

def score_run(run, outputs, odin, odin_pick, data, args, device):
    """Fit the detectors, run their --aps search, score ID test and OOD sets -> ({det: {split: scores}}, acc, picks)."""
    on_device = lambda o: o and {k: torch.from_numpy(np.asarray(o[k])).to(device) for k in ('features', 'logits')} | {
        'labels': torch.from_numpy(np.asarray(o['labels'])).to(device).long()}
    W, b = (run['model'][k].to(device).double() for k in ('fc.weight', 'fc.bias'))
    # train and val stay float32 (fit() accumulates in float64); scored rows become float64 block by block
    stats = fit(on_device(outputs.get('train')), on_device(outputs['val']), W, b, args)
    acc = 100 * float((outputs['id']['logits'].argmax(1) == outputs['id']['labels']).mean())

    def score(det, split, a):  # in blocks of rows: ImageNet-1K's 45k test features alone are 0.7 GB in float64
        z, h = (torch.from_numpy(outputs[split][k]) for k in ('logits', 'features'))
        return np.concatenate([SCORES[det](z[i:i + 8192].to(device).double(), h[i:i + 8192].to(device).double(), stats,
                                           a).cpu().numpy() for i in range(0, max(len(z), 1), 8192)])
    det_args, picks = {det: args for det in args.detectors}, {'odin': odin_pick} if odin_pick else {}
    grid, id_side = APS_OPENOOD if args.aps == 'openood' else APS_GRIDS, 'id' if args.aps == 'sio' else 'val'
    for det in [d for d in args.detectors if args.aps and d in grid and d != 'odin']:
        det_args[det], picks[det] = aps_search(det, args, lambda a: score(det, id_side, a),
                                               lambda a: score(det, 'aps_ood', a), len(data['splits']['train'][1]))
    if picks:
        print(f"aps ({args.aps}) {run['name']}: " + '; '.join(f'{det} ' + ', '.join(f'{k} {v}' for k, v in p.items())
                                                            for det, p in picks.items()))
    scores = {det: {} for det in args.detectors}
    for split in ['id'] + data['oods']:
        for det in args.detectors:  # --aps sio: the ID side keeps the default setting, as the SIO code's evaluator
            a = args if split == 'id' and args.aps == 'sio' else det_args[det]
            scores[det][split] = odin[split] if det == 'odin' else score(det, split, a)
            if not np.isfinite(scores[det][split]).all():
                fail(f"{run['name']}: detector {det} gives non-finite scores on {split} (degenerate statistics?): "
                     f"leave {det} out of --detectors")
    for det in [d for d in args.detectors if np.ptp(np.concatenate(list(scores[d].values()))) == 0]:
        say(f"warning: {run['name']}: {det} gives every image the same score (AUROC 50): its settings rank nothing")
    return scores, acc, picks

def report(args, settings, data, tables, all_scores, aps_picks, timing):
    """The tables (printed, results.md), results.json / .csv, scores.npz and the plots of the first run."""
    members = {g: [n for n, group in data['groups'].items() if group == g] for g in ('near', 'far')}
    covers = {g: ', '.join(names) for g, names in members.items()}
    results = {s: {det: aggregate(tables[s][det]) for det in args.detectors} for s in settings}
    text = '\n'.join((f'## {s}\n\n' if s else '') + format_tables(results[s], covers, len(runs))
                     for s, runs in settings.items())
    if len(settings) > 1:
        text += f'\n## comparison (near = {covers["near"]}; far = {covers["far"]}; mean ± std over runs)\n\n' + \
            table_rows(['detector', 'setting'], [([det, s], by_det[det], len(settings[s])) for det in args.detectors
                                                 for s, by_det in results.items()])
    print(text + '\n' + timing)
    if args.out:
        meta = dict(runs={s: [run['name'] for run in runs] for s, runs in settings.items()}, dataset=data['dataset'],
                    **members)
        if args.aps:  # what the search chose, per run and detector, with its validation AUROC
            meta['aps'] = dict(mode=args.aps, ood=args.aps_ood or f"val_{BENCHMARKS[data['dataset']]['val_ood']} "
                               '(OpenOOD list)', picks=aps_picks)
        rows = [['setting', 'detector', 'dataset'] + [m + s for m in METRICS for s in ('', '_std')]] + [
            [setting, det, row] + [f'{values[m + s]:.4f}' for m in METRICS for s in ('', '_std')]
            for setting, by_det in results.items() for det, table in by_det.items() for row, values in table.items()]
        as_json = dict(results[''] if '' in results else results, _meta=meta)  # several settings: setting first
        write_atomic(Path(args.out) / 'results.json', lambda tmp: Path(tmp).write_text(json.dumps(as_json, indent=1)))
        write_atomic(Path(args.out) / 'results.md', lambda tmp: Path(tmp).write_text(text))
        write_atomic(Path(args.out) / 'results.csv', lambda tmp: write_csv(tmp, rows))
        write_atomic(Path(args.out) / 'scores.npz', lambda tmp: save_npz(tmp, **all_scores))
        finish(args.out)
        print(f'wrote {args.out}/results.json, results.csv, results.md, scores.npz')
    if args.plots:
        first = next(iter(settings.values()))[0]['name']
        for det in args.detectors:
            save_plot(det, {split: all_scores[f'{first}/{det}/{split}'] for split in ['id'] + data['oods']},
                      Path(args.plots) / f'{det}.png')
        finish(args.plots)
        print(f'wrote {len(args.detectors)} plots ({first}) to {args.plots}')

def write_csv(path, rows):
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows(rows)

def cell(row, metric, runs):
    return f'{row[metric]:.2f}' + (f' ± {row[metric + "_std"]:.2f}' if runs > 1 else '')

def format_tables(results, covers, runs):  # markdown: one OpenOOD table per detector, then the summary (SIO paper's)
    covers = {g: c or 'none' for g, c in covers.items()}
    lines = []
    for det, table in results.items():
        lines += [f'### {det}', '', '| dataset | ' + ' | '.join(METRIC_TITLES[m] for m in METRICS) + ' |',
                  '|---' * (len(METRICS) + 1) + '|']
        lines += [f"| {f'**{row}** ({covers[row]})' if row in covers else row} | "
                  + ' | '.join(cell(table[row], m, runs) for m in METRICS) + ' |' for row in table] + ['']
    lines += [f'### summary ({runs} run{"s" if runs > 1 else ""}; near = {covers["near"]}; far = {covers["far"]})', '']
    return '\n'.join(lines) + '\n' + table_rows(['detector'], [([det], table, runs) for det, table in results.items()])

def table_rows(heads, rows):  # the summary: heads, near / far AUROC and FPR@95, ACC for each (labels, table, runs)
    lines = ['| ' + ' | '.join(heads + ['near AUROC', 'far AUROC', 'near FPR@95', 'far FPR@95', 'ACC']) + ' |',
             '|---' * (len(heads) + 5) + '|']
    for labels, table, runs in rows:
        cells = [cell(table[g], m, runs) if g in table else '-' for m in ('AUROC', 'FPR95') for g in ('near', 'far')]
        lines.append('| ' + ' | '.join(labels + cells + [cell(next(iter(table.values())), 'ACC', runs)]) + ' |')
    return '\n'.join(lines) + '\n'

def save_plot(det, scores, file):  # score histograms, ID against each OOD set, and their ROC curves, in one PNG
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.2))
    for ax, name in zip(axes, list(scores)[1:]):  # stepfilled: one polygon instead of 50 bars
        for label, values in (('ID', scores['id']), (name, scores[name])):
            ax.hist(values, bins=50, alpha=0.6, density=True, label=label, histtype='stepfilled')
        ax.set_title(f'{det}: ID vs {name}')
        ax.legend()
        fpr, tpr, _ = skm.roc_curve(np.r_[np.zeros(len(scores['id'])), np.ones(len(scores[name]))],
                                    -np.r_[scores['id'], scores[name]])
        axes[-1].plot(fpr, tpr, label=name)
    axes[-1].plot([0, 1], [0, 1], 'k:')
    axes[-1].set(title=f'{det}: ROC (OOD positive)', xlabel='FPR', ylabel='TPR')
    axes[-1].legend()
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.16, top=0.9, wspace=0.25)  # tight_layout: a third of the time
    write_atomic(file, lambda tmp: fig.savefig(tmp, dpi=80, format='png'))
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Data, the same in every script: dict(train=(images, labels), val=..., test=..., classes, image_size,
# mean, std) with uint8 (N, H, W, 3) images, or file lists for image folders.

CIFAR_STATS = {'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),  # OpenOOD v1.5's
               'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIGIT_NAMES = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')
# The SIO code's ImageNet subsets (imagenet_train_subclasses.py): positions among the 1,000 sorted
# ImageNet-1K class folders (imagenet-10 = the wnids of its train_imagenet_10.txt; dogs = 151..250).
IMAGENET_SUBSETS = {'imagenet-10': [404, 751, 94, 281, 62, 207, 31, 949, 814, 569],
                    'imagenet-dogs': list(range(151, 251))}

def digits_images():  # sklearn's digits as load_digits reads its CSV, without importing sklearn.datasets (1.4 s)
    import importlib.util
    csv = Path(importlib.util.find_spec('sklearn').origin).parent / 'datasets' / 'data' / 'digits.csv.gz'
    data = np.loadtxt(csv, delimiter=',')
    images = np.rint(data[:, :-1].reshape(-1, 8, 8, 1) * 255 / 16).astype(np.uint8)  # uint8 (N, 8, 8, 3), grey
    return np.repeat(images, 3, axis=-1), data[:, -1].astype(np.int64)

def load_digits_splits():  # ID = digits 0-5; per class a RandomState(0) permutation: 60% train, 10% val, 30% test
    (images, labels), parts = digits_images(), []
    for c in range(6):
        idx = np.flatnonzero(labels == c)
        n_train, n_val = int(0.6 * len(idx)), int(0.1 * len(idx))
        parts.append(np.split(idx[np.random.RandomState(0).permutation(len(idx))], [n_train, n_train + n_val]))
    splits = map(np.concatenate, zip(*parts))  # train, val, test indices
    out = {name: (images[ix], labels[ix]) for name, ix in zip(('train', 'val', 'test'), splits)}
    train = out['train'][0].astype(np.float64) / 255
    mean, std = tuple(map(float, train.mean(axis=(0, 1, 2)))), tuple(map(float, train.std(axis=(0, 1, 2))))
    return dict(out, classes=DIGIT_NAMES[:6], image_size=8, mean=mean, std=std)

def torchvision_set(cls, root, **kwargs):  # downloaded if absent; None when it cannot be
    for download in (False, True):
        try:
            return cls(root, download=download, **kwargs)
        except Exception:
            pass

def read_imglist(root, list_name, images='images_classic'):  # OpenOOD's 'relative/path label' lines -> (paths, labels)
    path = Path(root) / 'benchmark_imglist' / list_name
    if not path.is_file():
        fail(f'{path} does not exist: --openood-root takes the OpenOOD v1.5 folder of benchmark_imglist/ and {images}/')
    rows = [line.rsplit(' ', 1) for line in path.read_text().splitlines() if line.strip()]
    if not all(len(row) == 2 and row[1].lstrip('-').isdigit() for row in rows):
        fail(f'{path} has a line that is not "relative/path label": download it again')
    return [str(Path(root) / images / r) for r, _ in rows], np.array([int(y) for _, y in rows], np.int64)

def read_image(path):
    """An image file as uint8 RGB (H, W, 3), as torchvision's loader reads it (palette and alpha through
    PIL's convert), but 16-bit grey, which convert clips, by its high byte as PIL reads 16-bit colour."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            mode, grey = image.mode, image.mode.startswith('I')  # 'F' (floating-point) is refused below, undecoded
            pixels = None if mode == 'F' else np.asarray(image if grey else image.convert('RGB'))
    except Image.DecompressionBombError as e:
        raise BadImage(f'{path} is too large to decode safely ({e}): shrink it or remove it')
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for damaged and unknown files
        raise BadImage(f'cannot read image {path} ({type(e).__name__}): replace or remove that file')
    if mode == 'F':
        raise BadImage(f'{path} holds floating-point pixels: save it as an 8-bit image')
    if grey and (pixels.min() < 0 or pixels.max() > 65535):
        raise BadImage(f'{path} holds 32-bit values outside 0..65535: save it as an 8-bit image')
    return np.repeat((pixels >> 8).astype(np.uint8)[..., None], 3, axis=-1) if grey else pixels

def read_images(paths, size):  # -> uint8 (N, size, size, 3), resized by PIL only where the size differs
    from PIL import Image
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        image = read_image(path)
        out[i] = image if image.shape[:2] == (size, size) else np.asarray(Image.fromarray(image).resize((size, size)))
    return out

def image_folder(path, train_classes=None):  # ImageFolder layout: sorted class folders, sorted [(file, class folder)]
    if not Path(path).is_dir():
        fail(f'{path} does not exist or is no folder: a folder dataset needs PATH/train/<class>/*, PATH/val/<class>/*')
    found = sorted(d.name for d in Path(path).iterdir() if d.is_dir())
    if train_classes is not None and (extra := sorted(set(found) - set(train_classes))):
        fail(f'{path} has class folder {extra[0]}, which train/ lacks: add it there or remove it')
    return found, [(str(f), c) for c in found for f in sorted((Path(path) / c).rglob('*'))
                   if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]  # not a folder, pipe or device so named

def subset_classes(spec, classes):
    """imagenet-10 / imagenet-dogs or a file's first words (LOC_synset_mapping.txt works), sorted: SIO's label order."""
    if spec in IMAGENET_SUBSETS:
        if len(classes) != 1000:
            fail(f'--classes {spec} needs 1,000 class folders, not {len(classes)}: point --dataset at ImageNet-1K')
        return sorted(classes[i] for i in IMAGENET_SUBSETS[spec])
    try:
        names = sorted({line.split()[0] for line in Path(spec).read_text().splitlines() if line.strip()})
    except (OSError, UnicodeDecodeError) as e:
        fail(f'--classes {spec} cannot be read ({type(e).__name__}): pass imagenet-10, imagenet-dogs or a class list')
    return names

def load_dataset(name, data_root='./data', openood_root=None, classes=None):
    """classes (folder datasets): --classes' spec or a list of class folder names; the other classes'
    test images come back as other_classes (the SIO code's OOD set for ImageNet subsets)."""
    if name == 'digits':
        return load_digits_splits()
    if name in ('cifar10', 'cifar100'):
        import torchvision  # imported where it is used: 1.6 s at every start, and digits needs none of it
        cls = getattr(torchvision.datasets, name.upper())
        train, test = (torchvision_set(cls, data_root, train=is_train) for is_train in (True, False))
        if train is None or test is None:
            fail(f'{cls.__name__} is not under {os.path.abspath(data_root)} and cannot be downloaded: fix --data-root')
        if openood_root:  # OpenOOD v1.5's own split of the official test set, exactly
            lists = [read_imglist(openood_root, f'{name}/{split}_{name}.txt') for split in ('val', 'test')]
            val, test = ((read_images(files, 32), labels) for files, labels in lists)
        else:  # OpenOOD v1.5: 1,000 test images are validation, the other 9,000 the ID test set
            perm, test_y = np.random.RandomState(0).permutation(len(test.data)), np.array(test.targets, dtype=np.int64)
            val, test = (test.data[perm[:1000]], test_y[perm[:1000]]), (test.data[perm[1000:]], test_y[perm[1000:]])
        return dict(train=(train.data, np.array(train.targets, dtype=np.int64)), val=val, test=test, image_size=32,
                    classes=list(train.classes), mean=CIFAR_STATS[name][0], std=CIFAR_STATS[name][1])
    if not name.startswith('folder:'):
        fail(f'unknown --dataset {name!r}: use digits, cifar10, cifar100 or folder:PATH')
    root = Path(name[len('folder:'):])
    all_classes, train = image_folder(root / 'train')
    val = image_folder(root / 'val', all_classes)[1]  # labelled by class name: a split may lack a class
    test = image_folder(root / 'test', all_classes)[1] if (root / 'test').is_dir() else val
    classes = subset_classes(classes, all_classes) if isinstance(classes, str) else list(classes or all_classes)
    if unknown := sorted(set(classes) - set(all_classes)):
        fail(f'{root} has no class folder {unknown[0]}: fix the class list, or pass the dataset it comes from')
    if len(classes) < 2:  # from the folders or from --classes
        fail(f'{root} gives {len(classes)} class {classes}, a classifier needs 2 or more: add class folders, or fix '
             f'--classes')

    def select(files, names):  # the images of these classes, labelled by their position in names
        position = {c: i for i, c in enumerate(names)}
        kept = [(f, position[c]) for f, c in files if c in position]
        return [f for f, _ in kept], np.array([y for _, y in kept], dtype=np.int64)
    splits = dict(train=select(train, classes), val=select(val, classes))
    for split, (_, labels) in splits.items():  # val picks best.pt: it must see every class
        if missing := [c for i, c in enumerate(classes) if i not in labels]:
            fail(f'{root / split} has no image of class {missing[0]}: add some, or leave it out (--classes FILE)')
    other = [c for c in all_classes if c not in classes]
    return dict(splits, classes=classes, test=select(test, classes), other_classes=select(test, other)[0],
                image_size=224, mean=IMAGENET_STATS[0], std=IMAGENET_STATS[1])


# Benchmarks: every split is a uint8 (N, S, S, 3) array at the ID size S or a list of image files, both
# through OpenOOD's test transform (RGB, Resize(pre_size), CenterCrop(S); normalised in the network pass).

class ImageList(list):
    """Image files named by one of OpenOOD's lists: the cache keys them by the list, not their bytes."""

def resize_crop(image, pre_size, size):
    """OpenOOD's test transform on one uint8 (H, W, 3) image as torchvision runs it on a PIL image: Resize(pre_size),
    bilinear, the longer side truncated, then CenterCrop(size) at the rounded offset (Python's round: half to even)."""
    from PIL import Image
    h, w = image.shape[:2]
    new_h, new_w = (pre_size, int(pre_size * w / h)) if h <= w else (int(pre_size * h / w), pre_size)
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.array(image[top:top + size, left:left + size])  # a copy: writable and contiguous

def resize_all(images, pre_size, size):  # uint8 (N, H, W) grey or (N, H, W, 3) -> (N, size, size, 3), same transform
    images = np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images
    return images if images.shape[1:3] == (size, size) and pre_size == size else np.stack(
        [resize_crop(image, pre_size, size) for image in images])

def check_memory(nbytes, what, fix, device_name):  # refused up front: nbytes over the free memory (the GPU's on CUDA)
    if torch.device(device_name).type == 'cuda':
        free = torch.cuda.mem_get_info(torch.device(device_name))[0]
    else:  # Linux's estimate; elsewhere not checked
        meminfo = Path('/proc/meminfo').read_text() if Path('/proc/meminfo').exists() else 'MemAvailable: inf'
        free = float(re.search(r'MemAvailable:\s+(\S+)', meminfo).group(1)) * 1024
    if nbytes > free:
        fail(f'{what} needs {nbytes / 2 ** 30:.1f} GiB and {device_name} has {free / 2 ** 30:.1f} GiB free: {fix}')

def ignore_interrupts(worker_id):  # DataLoader workers: Ctrl-C is the main process's to report
    signal.signal(signal.SIGINT, signal.SIG_IGN)

def read_batch(items):  # [(file, pre_size, size)] -> uint8 (n, 3, size, size), in a DataLoader worker
    images = [resize_crop(read_image(file), pre_size, size) for file, pre_size, size in items]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)

def image_files(path):  # every image file under a folder, recursively, as sorted strings ([] when it is no folder)
    files = Path(path).rglob('*') if Path(path).is_dir() else []
    return sorted(str(f) for f in files if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())

def folder_images(flag, path, what='images'):  # a folder named by flag ('--far NAME=PATH'): its image files
    files = image_files(path)
    if not files:
        why = 'is a file' if Path(path).is_file() else 'holds no images' if Path(path).is_dir() else 'does not exist'
        fail(f'{flag} {why}: pass a folder of {what} ({", ".join(IMAGE_EXTENSIONS)})')
    return files

def openood_list(root, dataset, name, required=True):
    """OpenOOD v1.5's benchmark_imglist/<dataset>/<name>.txt -> ((files, labels), None), its folder in images_classic/
    (CIFAR's, Textures) or images_largescale/ checked; missing: one line naming the download, or (None, why)."""
    images = Path(root) / ('images_classic' if dataset.startswith('cifar') or name == 'test_textures' else
                           'images_largescale')
    if not required and not (Path(root) / 'benchmark_imglist' / dataset / f'{name}.txt').is_file():
        return None, f'no benchmark_imglist/{dataset}/{name}.txt (download entry benchmark_imglist)'
    files, labels = read_imglist(root, f'{dataset}/{name}.txt', images.name)
    top = Path(files[0]).relative_to(images).parts[0] if files else None
    if files and (images / top).is_dir():
        return (ImageList(files), labels), None
    why = (f'{images / top} does not exist: download OpenOOD v1.5\'s {top} entry there ({name}.txt reads it)'
           + "; ImageNet-1K's train images come from image-net.org" * (top == 'imagenet_1k') if files else
           f'benchmark_imglist/{dataset}/{name}.txt is empty: download the benchmark_imglist entry again')
    return fail(why) if required else (None, why)

def openood_dataset(root, dataset, with_train):  # ID train (when fitted on) / val / test from OpenOOD v1.5's lists
    num_classes, cifar = BENCHMARKS[dataset]['classes'], dataset.startswith('cifar')
    mean, std = CIFAR_STATS[dataset] if cifar else IMAGENET_STATS
    ds = dict(classes=[str(c) for c in range(num_classes)], image_size=32 if cifar else 224, mean=mean, std=std,
              train=(ImageList(), np.zeros(0, np.int64)))
    for split in ('train', 'val', 'test')[0 if with_train else 1:]:
        ds[split] = openood_list(root, dataset, f'{split}_{dataset}')[0]
        if not 0 <= ds[split][1].min() <= ds[split][1].max() < num_classes:
            fail(f'{root}/benchmark_imglist/{dataset}/{split}_{dataset}.txt has labels outside 0..{num_classes - 1}: '
                 f'download the benchmark_imglist entry again')
    return ds

def sample_image_patches(index):  # digits' far-OOD: an sklearn photo's grey 16x16 crops, area-downscaled to 8x8
    from sklearn.datasets import load_sample_images
    image = load_sample_images().images[index].astype(np.float64)
    grey = image @ np.array([0.299, 0.587, 0.114])
    rows, cols = grey.shape[0] // 16, grey.shape[1] // 16
    patches = grey[:rows * 16, :cols * 16].reshape(rows, 16, cols, 16).transpose(0, 2, 1, 3).reshape(-1, 16, 16)
    small = patches.reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
    low, high = small.min(axis=(1, 2), keepdims=True), small.max(axis=(1, 2), keepdims=True)
    stretched = np.rint((small - low) / np.maximum(high - low, 1e-8) * 255).astype(np.uint8)
    return np.repeat(stretched[..., None], 3, axis=-1)

def builtin_ood(name, args, dataset):
    """A set of the benchmark: digits' own, OpenOOD's list (--openood-root), else torchvision's (CIFAR-10/100,
    MNIST, SVHN; Textures = all 5,640 DTD images, Places365 = val) -> (images or None, why not)."""
    if dataset == 'digits':
        images, labels = digits_images()
        return images[labels >= 6] if name == 'digits6-9' else sample_image_patches(['china', 'flower'].index(name)), ''
    listed, why = openood_list(args.openood_root, dataset, f'test_{name}', False) if args.openood_root else (None, '')
    if listed or dataset.startswith('imagenet') or name == 'tin':
        return (listed[0] if listed else None), why or 'not found'
    from torchvision import datasets as tv
    if name == 'texture':
        parts = [torchvision_set(tv.DTD, args.data_root, split=s) for s in ('train', 'val', 'test')]
        return (None if None in parts else [str(f) for part in parts for f in part._image_files]), 'not found'
    cls, kwargs = dict(cifar10=(tv.CIFAR10, dict(train=False)), cifar100=(tv.CIFAR100, dict(train=False)),
                       mnist=(tv.MNIST, dict(train=False)), svhn=(tv.SVHN, dict(split='test')),
                       places365=(tv.Places365, dict(split='val', small=True)))[name]
    ds = torchvision_set(cls, args.data_root, **kwargs)
    if ds is None:
        return None, 'not found'
    images = [f for f, _ in ds.imgs] if name == 'places365' else np.asarray(ds.data)
    return (images.transpose(0, 2, 3, 1) if name == 'svhn' else images), ''

def ood_sets(args, dataset, pre_size, size, other_classes=None):
    """{name: (group, images)}: the benchmark's sets (missing: a warning, an error with --strict), then --near / --far
    folders; other_classes (those a folder run left out: ImageNet-10 vs the other 990) are near-OOD, as the SIO code."""
    plan = {name: (group, None) for group in ('near', 'far') for name in BENCHMARKS.get(dataset, {}).get(group, [])}
    if args.no_tin:
        plan.pop('tin', None)
    plan.update({name: (group, path) for group in ('near', 'far') for name, path in getattr(args, group)})
    sets = {'other-classes': ('near', other_classes)} if other_classes else {}
    for name, (group, path) in plan.items():
        images, why = builtin_ood(name, args, dataset) if path is None else (
            folder_images(f'--{group} {name}={path}', path), '')
        if images is None:
            how = (f'pass --{group} {name}=PATH (an image folder) or --openood-root' if name == 'tin' or
                   dataset.startswith('imagenet') else f'put it under {os.path.abspath(args.data_root)} (torchvision '
                   f'format), pass --{group} {name}=PATH, or --openood-root')
            if args.strict:
                fail(f'OOD set {name} is missing ({why}): {how}')
            print(f'warning: skipping OOD set {name} ({group}): {why}; {how}', file=sys.stderr)
            continue
        sets[name] = (group, images if isinstance(images, list) else resize_all(images, pre_size, size))
    return sets

def load_data(args, dataset, runs):  # {split: (images, labels)} (OOD labels -1), the OOD groups and how to read them
    folder = dataset.startswith('folder:')
    if args.openood_root and dataset in BENCHMARKS and dataset != 'digits':  # OpenOOD v1.5's lists, exactly
        ds = openood_dataset(args.openood_root, dataset, needs_train(args))
    else:
        ds = load_dataset(dataset, args.data_root, None, runs[0].get('classes') if folder else None)
    size = runs[0]['image_size'] if folder else ds['image_size']
    # OpenOOD: Resize(32) for CIFAR (a no-op at 32x32), Resize(256) + CenterCrop(224) for ImageNet
    pre_size = size if dataset in ('digits', 'cifar10', 'cifar100') else int(size * 256 / 224)
    sets = ood_sets(args, dataset, pre_size, size, ds.get('other_classes'))
    splits = {'train': ds['train'], 'val': ds['val'], 'id': ds['test']}
    splits.update({name: (images, np.full(len(images), -1)) for name, (_, images) in sets.items()})
    if args.aps:  # validation OOD images for the search, never part of the table
        val_ood = BENCHMARKS.get(dataset, {}).get('val_ood', 'tin')
        listed = openood_list(args.openood_root, dataset, f'val_{val_ood}', False)[0] if args.openood_root else None
        files = folder_images(f'--aps-ood {args.aps_ood}', args.aps_ood, 'validation OOD images') if args.aps_ood \
            else listed and listed[0]
        if not files:
            fail(f'--aps needs validation OOD images: pass --aps-ood PATH (an image folder) or --openood-root with '
                 f'its val_{val_ood} list')
        splits['aps_ood'] = (files, np.full(len(files), -1))
    groups = {name: group for name, (group, _) in sets.items()}
    if not groups:
        fail(f'no OOD set available for {dataset}: pass --near NAME=PATH / --far NAME=PATH')
    return dict(splits=splits, groups=groups, oods=list(groups), dataset=dataset, classes=ds['classes'],
                mean=ds['mean'], std=ds['std'], size=size, pre_size=pre_size, keys={})


# ------------------------------------------------------------------------------------------------
# Model, the same in every script: torchvision ResNets with the two-line CIFAR stem change, a small CNN for 8x8 digits.

ARCH_SIZE = {'cnn': 8, 'resnet18': 32, 'resnet18_224': 224, 'resnet50': 224}  # native input sizes
ARCH_MIN_SIZE = {'cnn': 8, 'resnet18': 8, 'resnet18_224': 32, 'resnet50': 32}  # below: nothing left to pool

class Net(nn.Module):
    def __init__(self, arch, num_classes):
        super().__init__()
        if arch == 'cnn':
            def block(c_in, c_out):
                return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            self.body = nn.Sequential(*block(3, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            dim = 128
        else:
            import torchvision
            self.body = getattr(torchvision.models, arch.replace('_224', ''))()
            if arch == 'resnet18':  # CIFAR stem: 3x3 stride-1 conv, no max-pool (32x32 input)
                self.body.conv1, self.body.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
            dim, self.body.fc = self.body.fc.in_features, nn.Identity()
        self.fc, self.feature_dim = nn.Linear(dim, num_classes), dim

    def forward(self, x, features=False):  # features=True: also the penultimate feature h
        h = self.body(x)
        return (self.fc(h), h) if features else self.fc(h)

def normalize(x, mean, std, size):  # uint8 images (or floats on the same 0..255 scale) -> normalised, channels_last
    x = x.float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    x = (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last)

def read_checkpoint(file, what, fix='pass a best.pt or last.pt written by train_sio.py or train_oal.py'):
    """torch.load with one line for a file that is cut short, not one of ours, or not the Net it names."""
    try:
        ckpt = torch.load(file, map_location='cpu', weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, empty file...
        ckpt = f'cannot be read ({type(e).__name__}; cut short?)'
    if not isinstance(ckpt, dict) or not {'model', 'arch', 'num_classes', 'dataset'} <= ckpt.keys():
        fail(f'{what} {file} {ckpt if isinstance(ckpt, str) else "is not a synth-ood checkpoint"}: {fix}')
    try:  # every field a run needs, of the right kind
        mean, std = (np.asarray(ckpt[k], dtype=np.float64) for k in ('mean', 'std'))
        usable = (ckpt['arch'] in ARCH_SIZE and isinstance(ckpt['dataset'], str) and isinstance(ckpt['classes'], list)
                  and len(ckpt['classes']) == ckpt['num_classes']
                  and type(ckpt['image_size']) is int and ARCH_MIN_SIZE[ckpt['arch']] <= ckpt['image_size'] <= 2048
                  and mean.shape == std.shape == (3,) and np.isfinite(np.r_[mean, std]).all() and (std > 0).all())
    except (KeyError, TypeError, ValueError):
        usable = False
    if not usable:
        fail(f'{what} {file} lacks a usable arch, dataset, classes, image_size, mean or std: {fix}')
    if not weights_fit(ckpt['model'], ckpt['arch'], ckpt['num_classes']):
        fail(f"{what} {file} holds no {ckpt['arch']} with {ckpt['num_classes']} classes: {fix}")
    if broken := next((k for k, v in ckpt['model'].items() if not (v.is_floating_point() and torch.isfinite(v).all()
                                                                    or k.endswith('num_batches_tracked'))), None):
        fail(f'{what} {file} has NaN, infinite or integer weights ({broken}): {fix}')
    return dict(ckpt, mean=tuple(mean.tolist()), std=tuple(std.tolist()))  # tensors or arrays become plain floats

def weights_fit(state, arch, num_classes):  # exactly the keys and shapes of Net(arch, num_classes)'s state_dict
    with torch.device('meta'):  # shapes only: no memory, no initialisation
        expected = Net(arch, num_classes).state_dict() if type(num_classes) is int and num_classes > 0 else {}
    return isinstance(state, dict) and state.keys() == expected.keys() and all(
        isinstance(state[k], torch.Tensor) and state[k].shape == v.shape for k, v in expected.items())

def run_file(path, what):
    """A file as given; a run folder's best.pt, refused while its trainer has not finished."""
    path = Path(path)
    if not path.is_dir():
        return path
    fix = f'pass {path / "best.pt"} to use it as it is'
    manifest = read_json(path / MANIFEST, fix) if (path / MANIFEST).is_file() else {}
    if manifest.get('complete', True) is not True:
        fail(f'{what} {path} is unfinished (its trainer is still writing it, or was stopped): let it finish, or {fix}')
    return path / 'best.pt'


# Checkpoints: our runs (best.pt, last.pt), OpenOOD v1.5's (openood:PATH) and torchvision's (torchvision:NAME),
# all loaded strictly into Net. OpenOOD's ResNet18_32x32 has torchvision's resnet18 keys with a 3x3
# conv1, no max-pool and `shortcut` for `downsample`; its ResNet18_224x224 and ResNet50 are torchvision's.
TORCHVISION = {'resnet18': 'ResNet18_Weights', 'resnet50': 'ResNet50_Weights'}  # their IMAGENET1K_V1

def load_runs(spec, args):
    """A run folder (its best.pt) or checkpoint of ours, openood:PATH (a best.ckpt, or a folder of s*/best.ckpt seeds)
    or torchvision:NAME -> [run]: a checkpoint dict, its name, digest (the cache key) and folder (no output in it)."""
    if spec.startswith('openood:'):
        return openood_runs(Path(spec[len('openood:'):]), args.dataset)
    if spec.startswith('torchvision:'):
        return [torchvision_run(spec[len('torchvision:'):], args.dataset)]
    path = Path(spec)
    file = run_file(path, 'run')
    if not file.is_file():
        fail(f'{path} is neither a run directory with best.pt nor a checkpoint file: pass one, openood:PATH or '
             f'torchvision:NAME')
    ckpt = read_checkpoint(file, 'run', "pass a best.pt of train_sio.py or train_oal.py (openood:PATH for OpenOOD's)")
    return [dict(ckpt, name=path.name if path.is_dir() else path.stem, digest=file_digest(file), folder=file.parent,
                 source=str(path.resolve()))]

def foreign_run(state, file, name, dataset):
    """An OpenOOD or torchvision ResNet state_dict as our run: arch from its keys and shapes, classes from its head."""
    head = state.get('fc.weight') if isinstance(state, dict) else None
    mapped = {(k if k.startswith('fc.') else 'body.' + k.replace('.shortcut.', '.downsample.')): v
              for k, v in (state.items() if head is not None else [])}
    num_classes = head.shape[0] if isinstance(head, torch.Tensor) and head.ndim == 2 else None
    arch = next((a for a in ('resnet18', 'resnet18_224', 'resnet50') if weights_fit(mapped, a, num_classes)), None)
    if arch is None:
        found = ', '.join(list(state)[:3]) if isinstance(state, dict) and state else type(state).__name__
        fail(f'{file} fits none of ResNet18_32x32, ResNet18_224x224, ResNet50 (found {found}, ...; head '
             f'{tuple(head.shape) if isinstance(head, torch.Tensor) else "none"}): pass an OpenOOD v1.5 best.ckpt')
    return dict(model=mapped, arch=arch, num_classes=num_classes, dataset=dataset, image_size=ARCH_SIZE[arch],
                mean=None, std=None, name=name, digest=file_digest(file))

def openood_runs(path, dataset):
    """OpenOOD v1.5's bare state_dicts: a best.ckpt, or each s<seed>/best.ckpt of a folder as run <folder>_s<seed>."""
    if not dataset:
        fail(f'openood:{path} needs --dataset (cifar10, cifar100, imagenet200, imagenet): its checkpoints name no data')
    seeds = sorted(path.glob('s*/best.ckpt'), key=lambda f: (len(f.parent.name), f.parent.name))
    files = [path] if path.is_file() else [f for f in seeds if re.fullmatch(r's\d+', f.parent.name)]
    if not files:
        fail(f'openood:{path} is no best.ckpt and holds no s<seed>/best.ckpt: pass a best.ckpt or its seeds\' folder')
    runs = []
    for file in files:
        try:
            state = torch.load(file, map_location='cpu', weights_only=True)
        except Exception as e:  # truncated zip, pickle garbage, an empty file...
            fail(f'openood:{file} cannot be read ({type(e).__name__}; cut short?): pass an OpenOOD v1.5 best.ckpt')
        name = (f'{file.parent.parent.name}_{file.parent.name}' if re.fullmatch(r's\d+', file.parent.name) else
                file.parent.name if file.stem == 'best' else file.stem)
        runs.append(dict(foreign_run(state, file, name, dataset), source=f'openood:{file.resolve()}',
                         folder=path if path.is_dir() else file.parent))
    return runs

def torchvision_run(name, dataset):
    """torchvision's IMAGENET1K_V1 weights via its loading (hub cache, else download), as OpenOOD's ImageNet rows."""
    if name not in TORCHVISION:
        fail(f'torchvision:{name} is not offered: pass torchvision:resnet50 or torchvision:resnet18 (IMAGENET1K_V1)')
    import torchvision
    weights = getattr(torchvision.models, TORCHVISION[name]).IMAGENET1K_V1
    file = Path(torch.hub.get_dir()) / 'checkpoints' / weights.url.rsplit('/', 1)[1]
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # offline: URLError; a damaged download: RuntimeError
        fail(f'torchvision:{name} needs its IMAGENET1K_V1 weights, which could not be fetched ({type(e).__name__}): '
             f'download {weights.url} to {file} (torch\'s hub cache) and run again')
    return dict(foreign_run(state, file, f'torchvision_{name}', dataset or 'imagenet'), source=f'torchvision:{name}',
                folder=None)

def build_model(ckpt, device):
    model = Net(ckpt['arch'], ckpt['num_classes'])
    model.load_state_dict(ckpt['model'])
    return model.to(device).to(memory_format=torch.channels_last).eval()

def file_digest(path):  # sha256 of a file's bytes (first 16 hex digits)
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Arguments

def detector_list(text):  # --detectors: all, or a comma list of DETECTORS
    names = DETECTORS if text == 'all' else list(dict.fromkeys(d.strip() for d in text.split(',') if d.strip()))
    unknown = [d for d in names if d not in DETECTORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown detector(s) {', '.join(unknown) or text!r}: choose from "
                                         f"{', '.join(DETECTORS)} or 'all'")
    return names

def ood_folder(text):  # --near / --far NAME=PATH, NAME not one of the split or row names
    name, _, path = text.partition('=')
    if not name or not path:
        raise argparse.ArgumentTypeError(f'takes NAME=PATH (e.g. tin=data/tin), got {text!r}')
    if not re.fullmatch(r'\w[\w.+-]*', name):  # it names files in --cache and --out
        raise argparse.ArgumentTypeError(f'NAME {name!r} must be letters, digits and . _ + - (e.g. tin=data/tin)')
    if name in RESERVED:
        raise argparse.ArgumentTypeError(f'{name} is reserved (it names a split or a row: {", ".join(RESERVED)}): '
                                         f'pick another NAME')
    return name, path

def parse_settings(specs):  # positional RUNs, or NAME=RUN,RUN,... groups (one per setting) -> {setting: [runs]}
    if not any('=' in spec for spec in specs):
        return {'': list(specs)}
    if not all('=' in spec for spec in specs):
        fail('mix of plain runs and NAME=RUN,... settings: give every argument as NAME=RUN[,RUN...] or none')
    settings = {}
    for spec in specs:
        name, runs = spec.split('=', 1)
        if not name or name in settings or not runs.strip(',') or name == '_meta' or '/' in name:
            why = ('has no NAME' if not name else 'names no run' if not runs.strip(',') else 'is given twice'
                   if name in settings else "has a NAME that is reserved or holds '/' (a path with '=' in it?)")
            fail(f'setting {spec!r} {why}: give each setting as NAME=RUN[,RUN...] with a NAME of its own')
        settings[name] = [r for r in runs.split(',') if r]
    return settings

def get_args(argv=None):
    percent = number(float, 'in (0, 100)', lambda v: 0 < v < 100)
    p = Parser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', help='folders, .pt, openood:PATH, torchvision:NAME; or NAME=RUN,... per setting')
    p.add_argument('--dataset', help="ID set (default: the runs'): digits, cifar10/100, imagenet/200, folder:PATH")
    p.add_argument('--data-root', default='./data', help='where torchvision datasets live or are downloaded to')
    p.add_argument('--openood-root', help="OpenOOD v1.5's data folder (benchmark_imglist/, images_*/): its lists")
    for group, example in (('near', 'tin'), ('far', 'dtd')):
        p.add_argument(f'--{group}', action='append', default=[], type=ood_folder, metavar='NAME=PATH',
                       help=f'add or replace a {group}-OOD image folder, e.g. {example}=PATH')
    p.add_argument('--no-tin', action='store_true', help='near-OOD without TinyImageNet, as the SIO paper reports')
    p.add_argument('--strict', action='store_true', help='a missing built-in OOD set is an error, not a warning')
    p.add_argument('--detectors', type=detector_list, default='all', help='all, or some: ' + ','.join(DETECTORS))
    p.add_argument('--cache', help='keep logits/features in DIR/<run>/<split>.npz and reuse them')
    p.add_argument('--out', help='write results.json/.csv/.md and scores.npz here')
    p.add_argument('--overwrite', action='store_true', help="replace an earlier evaluation's results and plots")
    p.add_argument('--plots', help='write score histograms and ROC curves (PNG) here')
    p.add_argument('--batch-size', type=POSITIVE, default=512)
    p.add_argument('--workers', type=NATURAL, default=8, help='DataLoader workers reading image files')
    p.add_argument('--device', type=device, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--bf16', action='store_true', help='bf16 network pass: faster, scores move (default float32)')
    p.add_argument('--aps', choices=['sio', 'val', 'openood'],
                   help="search settings by validation AUROC: as the SIO code, on val, or with v1.5's grids")
    p.add_argument('--aps-ood', metavar='PATH', help="its OOD images (default: OpenOOD's val list, --openood-root)")
    # detector settings (OpenOOD v1.5 defaults)
    p.add_argument('--ebo-temperature', type=RATE, default=1.0, help='energy score T * logsumexp(z / T)')
    p.add_argument('--odin-temperature', type=RATE, default=1000.0)
    p.add_argument('--odin-eps', type=WEIGHT, default=0.0014, help='ODIN step in [0,1] pixel units')
    p.add_argument('--gen-gamma', type=RATE, default=0.1)
    p.add_argument('--react-percentile', type=percent, default=90.0)
    p.add_argument('--ash-percentile', type=percent, default=90.0, help='ASH-B keeps the top 100-p percent')
    p.add_argument('--dice-percentile', type=percent, default=90.0, help='DICE keeps the top 100-p percent of W')
    p.add_argument('--knn-k', type=POSITIVE, default=50)
    p.add_argument('--vim-dim', type=POSITIVE, help="ViM's principal dimensions (default 256; d/2 for d <= 256)")
    args = p.parse_args(argv)
    args.runs = parse_settings(args.runs)
    for flag in ('out', 'plots', 'cache'):
        if getattr(args, flag) == '':
            fail(f'--{flag} is empty: pass a folder, or leave the flag out')
    if args.aps_ood and not args.aps:
        fail('--aps-ood names the validation OOD images of --aps: pass --aps sio, val or openood too, or drop it')
    names = [name for name, _ in args.near + args.far]
    if len(set(names)) < len(names):
        fail(f'--near/--far name {max(names, key=names.count)} twice: give each OOD set a NAME of its own')
    if args.dataset and args.dataset not in BENCHMARKS and not args.dataset.startswith('folder:'):
        fail(f'unknown --dataset {args.dataset!r}: use {", ".join(BENCHMARKS)} or folder:PATH')
    if args.dataset in IMAGENETS and not args.openood_root:
        fail(f"--dataset {args.dataset} needs OpenOOD v1.5's lists: pass --openood-root DIR (with benchmark_imglist/)")
    folders = [(flag, Path(path).resolve()) for flag, path in (('--out', args.out), ('--plots', args.plots),
                                                              ('--cache', args.cache)) if path]
    for i, (flag, path) in enumerate(folders):
        if path.is_file():
            fail(f'{flag} {path} is a file, not a folder: pass a folder')
        for other, other_path in folders[i + 1:]:
            if path == other_path or path in other_path.parents or other_path in path.parents:
                fail(f'{flag} and {other} must be distinct folders, neither inside the other: pass another {other}')
    return args


# ================================================================================================
# Plumbing, identical in every script: one-line errors, flag types, one writer per output folder that
# owns only what its manifest records, atomic writes, one-line interrupts, torchrun.

MANIFEST = 'manifest.json'  # in every output folder: its script, settings and the entries it wrote
PATTERN = re.compile(r'[*?[]|\{\d+\.\.\d+\}')  # a manifest entry naming more than one file
TEMPORARY = re.compile(r'\.\d+\.tmp$')  # the end of write_atomic's name for a file it is writing
CLAIMED = {}  # resolved output folder -> [.lock file, manifest], for each folder this process holds
STATUS = dict(kept='', again='', resume='', stop=False)  # what an interrupt reports; one was asked for

class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):  # whole flags only: an interrupt's command drops or adds them by name
        super().__init__(*args, **kwargs, allow_abbrev=False)

    def error(self, message):  # argparse's own errors as the same one line, flag first
        fail(re.sub(r'^argument (\S+?)(/\S+)?: ', r'\1 ', message))

class BadImage(ValueError):
    """An image file that cannot be decoded, wherever it is found (a DataLoader worker too)."""

def fail(message):  # one line for the user, exit code 2, no traceback
    say(f'error: {message}')
    sys.exit(2)

def say(line):  # on stderr, on a line of its own under a progress bar (in a log file too, past its carriage returns)
    tqdm.write('\n' * bool(getattr(tqdm, '_instances', None)) + line, file=sys.stderr)

def number(kind, valid, ok):  # flag type: kind(text) that passes ok, else 'must be VALID' (NaN fails every comparison)
    def parse(text):
        value = None
        with suppress(ValueError):
            value = kind(text)
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f'must be {valid}, got {text}')
        return value
    return parse

POSITIVE = number(int, 'an integer >= 1', lambda v: v >= 1)
NATURAL = number(int, 'an integer >= 0', lambda v: v >= 0)
RATE = number(float, 'a number > 0 that float32 holds (1e-38 to 3e38)', lambda v: 1e-38 <= v <= 3e38)
WEIGHT = number(float, 'a number >= 0 that float32 holds (at most 3e38)', lambda v: 0 <= v <= 3e38)
SHARE = number(float, 'in [0, 1]', lambda v: 0 <= v <= 1)

def device(name):  # --device: one this machine has, said now rather than deep inside a run
    try:
        kind, count = torch.device(name), torch.cuda.device_count()
    except RuntimeError:
        raise argparse.ArgumentTypeError(f'{name!r} is not a device name: pass cpu, cuda or cuda:N')
    if kind.type not in ('cpu', 'cuda'):
        raise argparse.ArgumentTypeError(f'{name}: pass cpu, cuda or cuda:N')
    if kind.type == 'cuda' and (kind.index or 0) >= count:
        fix = f'cuda:0 .. cuda:{count - 1}' if count else '--device cpu'
        raise argparse.ArgumentTypeError(f'{name}: this machine has {count} CUDA device(s): pass {fix}')
    return name

def read_json(path, fix):  # a JSON object from a file, or one line saying it is damaged and what to do
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        value = f'unreadable ({type(e).__name__})'
    if not isinstance(value, dict):
        fail(f'{path} is {value if isinstance(value, str) else "not a JSON object"}: {fix}')
    return value

def on_rank0(rank, world, work):  # work() on rank 0; the others get its result, or leave with its exit code if it fails
    shared = [0, None]  # exit code, result
    try:
        shared[1] = work() if rank == 0 else None
    except SystemExit as stop:
        shared[0] = stop.code
    if world > 1:
        dist.broadcast_object_list(shared, 0)
    if shared[0]:
        sys.exit(shared[0])
    return shared[1]

def claim(out, flag, script, settings, overwrite, continues, what, hint, inputs=(), dry=False):
    """Take an output folder by the one rule of every folder a script writes: one writer (an flock on OUT/.lock, dropped
    at any exit); none that is, holds or lies in an input, is another script's or holds a file its manifest does not
    name; output of other settings, or any when continues is False (or 'unfinished' and complete), is refused unless
    overwrite marks it stale (finish() removes what is not rewritten). All checks come first; dry=True stops there,
    holding the lock of a folder that has one, so that a busy folder is found before any other is touched."""
    if str(out) in ('', '.'):
        fail(f'{flag} {str(out)!r} names no folder of its own: pass a folder')
    out = Path(out)
    try:
        key = out.resolve()
        for name, path in [(name, Path(path).resolve()) for name, path in inputs if path and Path(path).exists()]:
            if key == path or path in key.parents or path.parent == key:
                fail(f"{flag} {out} {'is' if key == path else 'lies in' if path in key.parents else 'holds'} the "
                     f'{name} {path}: pass another {flag}')
        if key == Path(key.anchor) or out.exists() and not out.is_dir():
            fail(f'{flag} {out} is {"a file" if out.is_file() else "not a folder of its own"}: pass a folder')
        if owner := next((p for p in key.parents if (p / MANIFEST).is_file() and (p / '.lock').is_file()), None):
            fail(f'{flag} {out} lies in {owner}, an output folder of its own: pass a folder outside it')
        base = next(p for p in [out, *out.parents] if p.exists() or p.is_symlink())  # where it is or will be made
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            fail(f'{flag} {out} cannot be written ({base} is {"not writable" if base.is_dir() else "no folder"}): '
                 f'pass a folder you can write to')
        if out.is_dir():
            inspect(out, flag, script, settings, overwrite, continues, what, hint)
    except (OSError, RuntimeError) as e:  # a name too long, a loop of links, a folder that cannot be read
        fail(f'{flag} {out} cannot be used ({getattr(e, "strerror", None) or e}): pass another {flag}')
    if dry and not (out / '.lock').exists():
        return None
    if not holds(out, CLAIMED.get(key, [None])[0]):
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = os.fdopen(os.open(out / '.lock', os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), 'r+')
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fail(f'{out} is in use by another process (pid {lock.read().strip() or "?"}): wait for it to end, '
                 f'or pass another {flag}')
        except OSError as e:
            fail(f'{flag} {out} cannot be written ({e.strerror or type(e).__name__}): pass a folder you can write to')
        lock.truncate(0)
        print(os.getpid(), end='', file=lock, flush=True)
        CLAIMED[key] = [lock, None]  # held from now on, refused or not: this process may ask again
    manifest, files, changed = inspect(out, flag, script, settings, overwrite, continues, what, hint)  # locked now
    if dry:
        return None
    CLAIMED[key][1] = manifest
    for temporary in filter(TEMPORARY.search, files):
        (out / temporary).unlink()  # a killed writer's: this process holds the lock now
    if overwrite or changed:
        manifest.update(settings=settings, stale=list(manifest['files']), done=[], complete=False)
    if overwrite or changed or not (out / MANIFEST).exists():  # else nothing is written yet
        save_manifest(out)
    if overwrite:  # what an interrupt from here on says, and its command continues (without --overwrite)
        STATUS['kept'] = STATUS['kept'] or f'{out} is unfinished (--overwrite began it afresh)'
    return manifest

def holds(out, lock):  # this process still holds OUT: lock is the file under the name OUT/.lock now
    return bool(lock) and (out / '.lock').exists() and os.stat(out / '.lock').st_ino == os.fstat(lock.fileno()).st_ino

def inspect(out, flag, script, settings, overwrite, continues, what, hint):
    """claim()'s checks of a folder's contents -> (manifest, files, changed settings); nothing is written."""
    blank, file = dict(script=script, settings=None, files=[], stale=[], done=[], complete=False), out / MANIFEST
    if file.is_symlink() or file.exists() and not file.is_file():
        fail(f'{flag} {out} has a {MANIFEST} that is no plain file (a link, pipe or folder): pass another {flag}')
    manifest = read_json(file, f'pass another {flag}') if file.exists() else blank
    kinds = dict(script=str, settings=(dict, type(None)), files=list, stale=list, done=list, complete=bool)
    if not (all(isinstance(manifest.get(k), kind) for k, kind in kinds.items())
            and all(isinstance(e, str) for e in manifest['files'] + manifest['stale'])
            and all(isinstance(d, list) and len(d) == 2 and all(type(v) is int for v in d) for d in manifest['done'])):
        fail(f'{flag} {out} has a {MANIFEST} no synth-ood script wrote (damaged or foreign): pass another {flag}')
    if manifest['script'] != script:
        fail(f'{flag} {out} holds a {manifest["script"]} folder, not a {script} one: pass another {flag}')
    files, named = contents(out), recorded(manifest['files'] + [MANIFEST])
    lock = out / '.lock'  # ours: a plain file of one name that holds a pid or nothing
    ours = lambda: lock.is_file() and lock.stat().st_nlink == 1 and re.fullmatch(r'\d*', lock.read_text().strip())
    others = ['.lock'] * (lock.is_symlink() or lock.exists() and not ours())
    others += sorted(f for f in files if not named(TEMPORARY.sub('', f)) or (out / f).is_symlink())
    if others:
        fail(f'{flag} {out} holds files this script did not write ({", ".join(others[:3])}'
             f'{", ..." * (len(others) > 3)}): pass a new or empty folder, or move them out')
    old, new = manifest['settings'] or {}, settings or {}
    changed = '; '.join(f'{k} {old.get(k)!r} -> {new.get(k)!r}' for k in dict(old, **new) if old.get(k) != new.get(k))
    live = recorded([e for e in manifest['files'] if e not in manifest['stale']])
    if (manifest['done'] or any(map(live, files))) and not overwrite and (
            changed or continues is False or continues == 'unfinished' and manifest['complete']):
        fail(f'{flag} {out} holds {what}{f" made with other settings ({changed})" if changed else ""}: '
             + (f'keep its settings, pass --overwrite to start afresh, or pass another {flag}' if changed else hint))
    return manifest, files, changed

def contents(out):  # what OUT holds but folders and its lock (files, links, pipes...), as paths relative to OUT
    return [p.relative_to(out).as_posix() for p in Path(out).rglob('*')  # a link is listed, never followed
            if (not p.is_dir() or p.is_symlink()) and p != Path(out) / '.lock']

def recorded(entries):
    """A test whether a path relative to an output folder is named by one of entries: a name; a pattern ('*', '?' and
    '[...]' within one part of the path, '{a..b}' a number from a to b as wide as a); or 'name/': all in it."""
    def piece(part):  # '[...]' and '[!...]' as fnmatch reads them; '{a..b}' a number, compared below
        if part[0] == '[' and len(part) > 1:
            return '[' + '^' * (part[1] == '!') + re.sub(r'([\\^[\]])', r'\\\1', part[1 + (part[1] == '!'):-1]) + ']'
        return r'(\d+)' if len(part) > 1 else {'*': '[^/]*', '?': '[^/]'}.get(part, re.escape(part))
    tests = []
    for entry in entries:
        parts = re.findall(r'\{\d+\.\.\d+\}|\[!?\]?[^]]*\]|.', entry.rstrip('/'), re.S)
        ranges = [part[1:-1].split('..') for part in parts if part[0] == '{' and len(part) > 1]
        tests.append((re.compile(''.join(map(piece, parts)) + '(?:/.*)?' * entry.endswith('/'), re.S), ranges))
    within = lambda numbers, ranges: all(n == f'{int(n):0{len(a)}d}' and int(a) <= int(n) <= int(b)
                                         for n, (a, b) in zip(numbers, ranges))
    return lambda path: any((m := regex.fullmatch(path)) and within(m.groups(), ranges) for regex, ranges in tests)

def literal(name):  # a path as a manifest entry (see recorded()) naming just that file
    return re.sub(r'([*?[{])', r'[\1]', name)

def save_manifest(out, **changes):
    manifest = CLAIMED[Path(out).resolve()][1]
    manifest.update(changes)
    write_atomic(Path(out) / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))

def record(out, *entries):
    """Enter entries (see recorded()) in out's manifest before they are written; a stale pattern is taken over."""
    manifest = CLAIMED[Path(out).resolve()][1]
    new = [e for e in entries if e not in manifest['files']]
    taken = [e for e in entries if e in manifest['stale'] and PATTERN.search(e)]
    if new or taken:
        save_manifest(out, files=sorted(set(manifest['files'] + new)),
                      stale=[e for e in manifest['stale'] if e not in taken])

def finish(out, keep=None, **changes):
    """Record out as complete once sure this process still holds it. Removed: the files only the previous run's stale
    entries name, and with keep (relative paths) every other file this run's patterns name."""
    out, (lock, manifest) = Path(out), CLAIMED[Path(out).resolve()]
    if not holds(out, lock):
        fail(f'{out} was removed or replaced while this ran: run the same command again')
    live = [e for e in manifest['files'] if e not in manifest['stale']]
    stale, named, patterns = recorded(manifest['stale']), recorded(live), recorded(filter(PATTERN.search, live))
    for file in contents(out):
        if stale(file) and not named(file) or keep is not None and patterns(file) and file not in keep:
            (out / file).unlink()
            for folder in (out / file).parents[:len(Path(file).parts) - 1]:
                if any(folder.iterdir()):
                    break
                folder.rmdir()
    save_manifest(out, files=live, stale=[], complete=True, **changes)

def write_atomic(path, write):
    """write(a temporary name), then rename it over path: a crash or a full disk never leaves half a file there."""
    path, tmp = Path(path), Path(f'{path}.{os.getpid()}.tmp')
    out = next((d for d, (_, m) in CLAIMED.items() if m and d in path.resolve().parents), None)
    name = out and path.name != MANIFEST and path.resolve().relative_to(out).as_posix()
    entry = name and literal(name)
    if entry and not recorded(CLAIMED[out][1]['files'])(name):
        record(out, entry)  # in a claimed folder, before it is written; no longer stale after
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
        fail(f'could not write {path} ({e}); the previous {path.name}, if any, is intact: free some space or '
             f'pass another folder')
    finally:
        tmp.unlink(missing_ok=True)
    if entry and entry in CLAIMED[out][1]['stale']:
        save_manifest(out, stale=[e for e in CLAIMED[out][1]['stale'] if e != entry])

@contextmanager
def user_errors(argv, add=(), drop=()):
    """One line for Ctrl-C or SIGTERM (what is kept, the command that continues; exit 130) and a bad image (exit 2).
    Once something is kept (STATUS['kept']), the command that continues it drops some flags and adds others."""
    local = os.environ.get('LOCAL_WORLD_SIZE', '1') if world_size() > 1 else '1'  # under torchrun: torchrun again
    launch = ['python'] if local == '1' else ['torchrun', f'--nproc_per_node={local}']
    again = lambda words: shlex.join(launch + [os.path.relpath(__file__)] + words)
    STATUS.update(kept='', again=again(argv), stop=False,
                  resume=again([a for a in argv if a not in drop] + [a for a in add if a not in argv]))
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    def interrupt(*_):
        STATUS['stop'] = True
        raise KeyboardInterrupt
    previous = [signal.signal(s, interrupt) for s in signals]
    try:
        yield
        if STATUS['stop']:  # raised inside a finalizer, where Python prints and drops it: a stop all the same
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        if not dist.is_initialized() or dist.get_rank() == 0:
            say(f'interrupted: {STATUS["kept"] or "nothing was written"}; continue with: '
                f'{STATUS["resume"] if STATUS["kept"] else STATUS["again"]}')
        sys.exit(130)
    except BadImage as e:  # from a worker, the message is the last line of its traceback's text
        fail(str(e).strip().splitlines()[-1].split('BadImage: ')[-1])
    finally:
        for s, handler in zip(signals, previous):
            signal.signal(s, handler)

def world_size():  # torchrun's WORLD_SIZE, 1 without it; one line when it is no process count
    text = os.environ.get('WORLD_SIZE', '1')
    if not text.isdigit() or int(text) < 1:
        fail(f'WORLD_SIZE={text} is no process count: launch with torchrun, or unset WORLD_SIZE')
    return int(text)

def setup_distributed(device_name):  # torchrun's environment -> (rank, world, device): NCCL on CUDA, else gloo
    if world_size() == 1:  # one process, no process group
        return 0, 1, torch.device(device_name)
    cuda = torch.device(device_name).type == 'cuda'
    try:
        dist.init_process_group('nccl' if cuda else 'gloo')
    except (ValueError, RuntimeError) as e:  # WORLD_SIZE set by hand, without torchrun's other variables
        fail(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but no process group can start ({str(e).splitlines()[0]}): "
             f'launch with torchrun, or unset WORLD_SIZE')
    local = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else 'cpu')
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), local

def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = get_args(argv)
    with user_errors(argv):  # --overwrite kept: --out is taken only once every result is there
        if not args.bf16:  # OpenOOD scores in float32: no TF32 in the convolutions or matmuls that feed the detectors
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        rank, world, device = setup_distributed(args.device)
        t_start = time.time()
        settings, data = prepare(args, device, rank)
        on_rank0(rank, world, lambda: [claim_outputs(args, settings, data, step) for step in ('check', 'cache')])
        tables, all_scores, aps_picks, seconds = {}, {}, {}, [0.0, 0.0]
        for setting, runs in settings.items():
            tables[setting] = {det: [] for det in args.detectors}
            for run in runs:
                t0 = time.time()
                outputs, model = network_outputs(run, data, args, device, rank, world)
                odin, odin_pick = odin_all(run, model, data, args, device, rank, world)
                t1 = time.time()
                if rank == 0:
                    scores, acc, picks = score_run(run, outputs, odin, odin_pick, data, args, device)
                    aps_picks.update({run['name']: picks} if picks else {})
                    for det in args.detectors:
                        tables[setting][det].append(run_table(scores[det], data['groups'], acc))
                        all_scores.update({f"{run['name']}/{det}/{split}": s for split, s in scores[det].items()})
                seconds = [seconds[0] + t1 - t0, seconds[1] + time.time() - t1]
        if rank == 0:
            claim_outputs(args, settings, data, 'results')
            count = sum(len(runs) for runs in settings.values())
            report(args, settings, data, tables, all_scores, aps_picks,
                   f'time: {time.time() - t_start:.1f}s in all; network passes {seconds[0]:.1f}s, detectors '
                   f'{seconds[1]:.1f}s ({count} run(s), {len(args.detectors)} detectors, device {device})')
        if world > 1:
            dist.destroy_process_group()

if __name__ == '__main__':
    main()
