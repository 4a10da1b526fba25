"""SIO: train an OOD-ready classifier on real + synthetic in-distribution images.

Paper: "SIO: Synthetic In-Distribution Data Benefits Out-of-Distribution Detection", Zhang et al.,
arXiv 2303.14531 (code: zjysteven/SIO, a fork of OpenOOD).
Idea: no outliers at all. A generative model makes more labelled ID images, and every batch holds
int(B*alpha) real and B - int(B*alpha) synthetic images under one cross-entropy, so the classifier
sees a denser ID manifold and post-hoc detectors (MSP, energy, KNN, ViM, ...) improve.
Without --synthetic it is the plain cross-entropy baseline (and the teacher / init for OAL).

    python train_sio.py --dataset digits --out runs/digits_ce_s0                # seconds on a CPU
    python train_sio.py --dataset digits --synthetic samples/digits_sio --out runs/digits_sio_s0
    python train_sio.py --dataset digits --seed 0,1,2 --out 'runs/digits_ce_s{seed}'   # one process
    python train_sio.py --dataset cifar10 --synthetic samples/c10_sio     # ResNet-18, 200 epochs, 102+26
    python train_sio.py --dataset cifar10 --synthetic PATH --method logitnorm|cutmix|oe --oe-data PATH
    python train_sio.py --dataset cifar10 --synthetic PATH --method pixmix --mixing-set fractals_and_fvis/
    python train_sio.py --dataset folder:data/imagenet --classes imagenet-10 --synthetic PATH  # 224, 60 ep
    torchrun --nproc_per_node=4 train_sio.py --dataset cifar100 --synthetic PATH
"""
import argparse
import fcntl, json, math, os, random, re, shlex, signal, string, sys, threading, time
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
from tqdm import tqdm

# The papers' recipes per kind of dataset; every flag overrides its entry.
RECIPES = {
    'cifar': dict(epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4, nesterov=True, alpha=0.8, pad=4, flip=True),
    'folder': dict(epochs=60, batch_size=256, lr=0.1, weight_decay=1e-4, nesterov=False, alpha=0.9, pad=0, flip=True),
    'digits': dict(epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4, nesterov=True, alpha=0.8, pad=1, flip=False),
}
MIN_LR = 1e-6  # per-iteration cosine from lr down to this (OpenOOD's cosine_annealing)
METHOD_FLAGS = {'logitnorm': ('tau',), 'oe': ('oe_data', 'oe_weight', 'oe_batch_size', 'oe_augment'),
                'pixmix': ('mixing_set', 'pixmix_k', 'pixmix_beta', 'aug_severity', 'pixmix_ops')}
RUN_FLAGS = ('dataset', 'classes', 'openood_root', 'arch', 'image_size', 'crop', 'synthetic', 'alpha', 'method',
             'epochs', 'batch_size', 'lr', 'weight_decay', 'seed')  # with METHOD_FLAGS: what a run's result depends on


# ------------------------------------------------------------------------------------------------
# The method: SIO's batch rule (exactly int(B*alpha) real + the rest synthetic, ceil(N_real / B)
# batches per epoch, both index lists reshuffled every epoch) and the plug-in losses.

def draw(n, count, generator):  # count indices from consecutive fresh permutations of range(n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(count / n))])[:count]

def sio_batches(n_real, n_syn, batch_size, alpha, generator):  # one epoch: a list of (real_idx, syn_idx) LongTensors
    num_batches = math.ceil(n_real / batch_size)
    if n_syn == 0 or alpha >= 1:  # baseline: every real image once, the last batch may be smaller
        perm = torch.randperm(n_real, generator=generator)
        return [(perm[i:i + batch_size], perm[:0]) for i in range(0, n_real, batch_size)]
    real_per_batch = int(batch_size * alpha)
    syn_per_batch = batch_size - real_per_batch
    # Faithful to SIO: only num_batches * real_per_batch real images are drawn per epoch (about 80% at
    # alpha 0.8); the rest wait for a later epoch's reshuffle.
    real = draw(n_real, num_batches * real_per_batch, generator)
    syn = draw(n_syn, num_batches * syn_per_batch, generator)
    return [(real[b * real_per_batch:(b + 1) * real_per_batch], syn[b * syn_per_batch:(b + 1) * syn_per_batch])
            for b in range(num_batches)]

def method_loss(method, logits, labels, tau=0.04, oe_weight=0.5, mix_labels=None, lam=1.0):
    """logits: len(labels) ID rows, then any outlier rows (OE). With SIO the ID rows are real and
    synthetic alike, so the mean CE over the batch is (B_r/B) CE(real) + (B_s/B) CE(synthetic)."""
    z_id, z_ood = logits[:len(labels)], logits[len(labels):]
    if method == 'logitnorm':  # LogitNorm (Wei et al. 2022): CE on logits normalised to length 1/tau
        z_id = z_id / (z_id.norm(dim=1, keepdim=True) + 1e-7) / tau
    loss = F.cross_entropy(z_id, labels)
    if mix_labels is not None:  # CutMix: the pasted box carries its own label, weighted by its area
        loss = lam * loss + (1 - lam) * F.cross_entropy(z_id, mix_labels)
    if len(z_ood):  # OE (Hendrycks et al. 2019): cross-entropy of outliers to the uniform distribution
        loss = loss + oe_weight * (z_ood.logsumexp(dim=1) - z_ood.mean(dim=1)).mean()
    return loss

def cutmix(x, labels):  # CutMix (beta 1, prob 1): paste a random box from a shuffled copy of the batch; lam = kept area
    n, _, h, w = x.shape
    lam = float(np.random.beta(1.0, 1.0))
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = np.random.randint(h), np.random.randint(w)
    y1, y2 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
    x1, x2 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    perm = torch.randperm(n, device=x.device)
    x = x.clone()
    x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    return x, labels[perm], 1 - (y2 - y1) * (x2 - x1) / (h * w)


# ------------------------------------------------------------------------------------------------
# PixMix (Hendrycks et al. 2022) as OpenOOD's preprocessor runs it (the SIO code's): start from the image or one
# augmentation of it, then mix in 0..k times (uniform) a fresh augmentation of the original or a mixing picture, adding
# or multiplying with random weights (a, b). Per image, in batch, on the training device; each op matches PIL's.

def int_parameter(level, maxval):  # AugMix's int_parameter, per image
    return torch.floor(level * maxval / 10)

def random_sign(level):
    return torch.where(torch.rand(len(level), device=level.device) > 0.5, -1.0, 1.0) * level

def affine(x, rows):
    """PIL's Image.transform(AFFINE, BILINEAR) per image: rows (n, 2, 3) map output pixel (x, y, 1) to
    the input; black outside. PIL truncates its bilinear result, hence floor (rounding is ~0.4 brighter)."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(*(torch.arange(side, device=x.device) + 0.5 for side in (h, w)), indexing='ij')
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    source = (points @ rows.transpose(1, 2)).view(n, h, w, 2)  # in pixels
    size = torch.tensor([w, h], device=x.device)
    sampled = F.grid_sample(x.float(), source / size * 2 - 1, padding_mode='border', align_corners=False)
    inside = ((source >= 0) & (source < size)).all(-1)[:, None]  # PIL fills a pixel whose source is off the image
    return torch.where(inside, sampled, 0).floor().clamp(0, 255).byte()

def geometric(x, kind, amount):  # rotate (degrees anticlockwise about the centre, as PIL), shear (factor), shift (px)
    n, _, h, w = x.shape
    rows = torch.eye(2, 3, device=x.device).repeat(n, 1, 1)
    if kind == 'rotate':  # input = centre + R (output - centre)
        cos, sin = torch.cos(torch.deg2rad(amount)), torch.sin(torch.deg2rad(amount))
        rows[:, 0, 0], rows[:, 0, 1], rows[:, 0, 2] = cos, -sin, w / 2 - cos * w / 2 + sin * h / 2
        rows[:, 1, 0], rows[:, 1, 1], rows[:, 1, 2] = sin, cos, h / 2 - sin * w / 2 - cos * h / 2
    else:  # PIL's data (1, s, 0, 0, 1, 0), (1, 0, 0, s, 1, 0), (1, 0, t, 0, 1, 0), (1, 0, 0, 0, 1, t)
        row, col = {'shear_x': (0, 1), 'shear_y': (1, 0), 'translate_x': (0, 2), 'translate_y': (1, 2)}[kind]
        rows[:, row, col] = amount
    return affine(x, rows)

def blend(degenerate, x, factor):  # PIL's ImageEnhance: degenerate + factor * (image - degenerate), cut to uint8
    return (degenerate + factor.view(-1, 1, 1, 1) * (x.float() - degenerate)).floor().clamp(0, 255).byte()

def grey(x):  # PIL's convert('L'): ITU-R 601-2 luma, rounded, as float (n, 1, h, w)
    return ((x[:, 0:1].float() * 299 + x[:, 1:2].float() * 587 + x[:, 2:3].float() * 114 + 500) / 1000).floor()

def autocontrast(x):  # PIL's ImageOps.autocontrast: each channel stretched to 0..255 (a flat channel is left as it is)
    low, high = x.amin((2, 3), keepdim=True).float(), x.amax((2, 3), keepdim=True).float()
    stretched = ((x.float() - low) * 255 / (high - low).clamp_min(1)).floor().clamp(0, 255).byte()
    return torch.where(high > low, stretched, x)

def equalize(x):  # PIL's ImageOps.equalize per image and channel: a lookup table from the cumulative histogram
    n, c, h, w = x.shape
    values = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, values, torch.ones_like(values))
    step = (h * w - hist.gather(1, values.amax(1, keepdim=True))) // 255  # all but the top value, in 255 steps
    lut = ((step // 2 + hist.cumsum(1) - hist) // step.clamp_min(1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))  # a flat channel is left as it is
    return lut.gather(1, values).byte().view(n, c, h, w)

def posterize(x, bits):  # PIL's ImageOps.posterize: keep the top `bits` bits of every channel (bits per image)
    return x & ((255 << (8 - bits.long())) & 255).byte().view(-1, 1, 1, 1)

def solarize(x, threshold):  # PIL's ImageOps.solarize: invert every value at or above threshold (per image)
    return torch.where(x.float() >= threshold.view(-1, 1, 1, 1), 255 - x, x)

def smooth(x):  # PIL's ImageFilter.SMOOTH (3x3, centre 5, others 1, /13), border unchanged: Sharpness's degenerate
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device) / 13
    out = x.float().clone()
    out[:, :, 1:-1, 1:-1] = F.conv2d(x.float(), kernel.expand(3, 1, 3, 3), groups=3).round()
    return out

# AugMix's operations as the PixMix code has them: level = U(0.1, severity) per image, scaled by each op
PIXMIX_OPS = {
    'autocontrast': lambda x, level: autocontrast(x),
    'equalize': lambda x, level: equalize(x),
    'posterize': lambda x, level: posterize(x, 4 - int_parameter(level, 4)),
    'rotate': lambda x, level: geometric(x, 'rotate', random_sign(int_parameter(level, 30))),
    'solarize': lambda x, level: solarize(x, 256 - int_parameter(level, 256)),
    'shear_x': lambda x, level: geometric(x, 'shear_x', random_sign(level * 0.3 / 10)),
    'shear_y': lambda x, level: geometric(x, 'shear_y', random_sign(level * 0.3 / 10)),
    'translate_x': lambda x, level: geometric(x, 'translate_x', random_sign(int_parameter(level, x.shape[-1] / 3))),
    'translate_y': lambda x, level: geometric(x, 'translate_y', random_sign(int_parameter(level, x.shape[-2] / 3))),
    # the four that overlap ImageNet-C: on in the SIO code (OpenOOD's all_ops), off in PixMix's CIFAR script
    'color': lambda x, level: blend(grey(x), x, level * 1.8 / 10 + 0.1),
    'contrast': lambda x, level: blend(grey(x).mean((1, 2, 3), True).add(0.5).floor(), x, level * 1.8 / 10 + 0.1),
    'brightness': lambda x, level: blend(torch.zeros((), device=x.device), x, level * 1.8 / 10 + 0.1),
    'sharpness': lambda x, level: blend(smooth(x), x, level * 1.8 / 10 + 0.1),
}

def augment_op(x, severity, all_ops):  # one AugMix op per image, chosen uniformly (all run on the batch: no host sync)
    ops = list(PIXMIX_OPS.values())[:None if all_ops else 9]
    which = torch.randint(len(ops), (len(x), 1, 1, 1), device=x.device)
    level = torch.empty(len(x), device=x.device).uniform_(0.1, severity)
    out = x
    for i, op in enumerate(ops):
        out = torch.where(which == i, op(x, level), out)
    return out

def mixing_weights(n, beta, device):  # PixMix's get_ab: (Beta(b, 1), Beta(1, b)) or (1 + Beta(1, b), -Beta(1, b))
    first = torch.rand(n, device=device) < 0.5
    beta_b1 = torch.distributions.Beta(torch.tensor(float(beta), device=device), torch.tensor(1.0, device=device))
    beta_1b = torch.distributions.Beta(torch.tensor(1.0, device=device), torch.tensor(float(beta), device=device))
    a = torch.where(first, beta_b1.sample((n,)), 1 + beta_1b.sample((n,)))
    b = torch.where(first, beta_1b.sample((n,)), -beta_1b.sample((n,)))
    return a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)

def pixmix(x, mixing_pics, k=4, beta=3.0, severity=3, all_ops=True, rounds=None):
    """uint8 x, mixing_pics (n, 3, h, w) -> float in [0, 255]; rounds: mixings per image (default: uniform in 0..k)."""
    n, device = len(x), x.device
    coin = lambda: torch.rand(n, 1, 1, 1, device=device) < 0.5
    mixed = torch.where(coin(), augment_op(x, severity, all_ops), x).float() / 255
    rounds = torch.randint(0, k + 1, (n,), device=device) if rounds is None else torch.as_tensor(rounds, device=device)
    rounds = rounds.view(-1, 1, 1, 1)
    for r in range(int(k)):
        partner = torch.where(coin(), augment_op(x, severity, all_ops), mixing_pics).float() / 255
        a, b = mixing_weights(n, beta, device)
        added = (a * (mixed * 2 - 1) + b * (partner * 2 - 1) + 1) / 2
        multiplied = (mixed * 2) ** a * (partner * 2).clamp_min(1e-37) ** b / 2
        mixed = torch.where(rounds > r, torch.where(coin(), added, multiplied).clamp(0, 1), mixed)
    return mixed * 255

def random_crops(pictures, count, size):
    """count uint8 (3, size, size) crops anywhere in random mixing pictures (OpenOOD's RandomCrop after Resize)."""
    flat, shapes, offsets = pictures
    pick = torch.randint(len(shapes), (count,), device=flat.device)
    h, w = shapes[pick, 0, None], shapes[pick, 1, None]
    steps = torch.arange(size, device=flat.device)
    rows = (torch.rand(count, 1, device=flat.device) * (h - size + 1)).long() + steps  # (count, size)
    cols = (torch.rand(count, 1, device=flat.device) * (w - size + 1)).long() + steps
    pixel = (rows[:, :, None] * w[:, :, None] + cols[:, None, :]) * 3  # HWC layout, as stored
    channel = torch.arange(3, device=flat.device).view(1, 3, 1, 1)
    return flat[offsets[pick].view(-1, 1, 1, 1) + pixel[:, None] + channel]


# ------------------------------------------------------------------------------------------------
# Training, in named steps: prepare (every input, once for all seeds), start (the seeded model, or the
# run in last.pt), train_epoch (SIO batches), end_epoch (checkpoints, log), train (one seed's run).

def prepare(args, device, rank):  # every input, read and checked once for all seeds; in-memory sets on the device
    ds = load_dataset(args.dataset, args.data_root, args.openood_root, args.classes)
    args.image_size = args.image_size or (ds['image_size'] if args.dataset == 'digits' else ARCH_SIZE[args.arch])
    if args.image_size < ARCH_MIN_SIZE[args.arch]:  # digits' 8x8 too: a 224 arch pools it away
        fail(f'--image-size must be at least {ARCH_MIN_SIZE[args.arch]} for --arch {args.arch}, got {args.image_size}')
    if args.method == 'oe':  # outliers join the batch in one forward pass
        args.oe_batch_size = args.oe_batch_size or 2 * args.batch_size
    batch = args.batch_size + (args.oe_batch_size or 0)
    check_memory(4 * 3 * batch * args.image_size ** 2, f'a batch of {batch} images at {args.image_size}x'
                 f'{args.image_size}', 'pass a smaller --image-size, --batch-size or --oe-batch-size', args.device)
    in_memory = not args.dataset.startswith('folder:')
    size = ds['image_size'] if in_memory else args.image_size  # in memory: native size, resized on the device
    meta = check_set(args.synthetic, '--synthetic', args.dataset, ds['classes'], 'sio') if args.synthetic else None
    syn_x, syn_y = (load_synthetic(args.synthetic, args.dataset, ds['classes'], size, not in_memory, args.device)
                    if args.synthetic else (None, None))
    data = dict(ds=ds, in_memory=in_memory, n_real=len(ds['train'][1]), n_syn=0 if syn_y is None else len(syn_y),
                crop_size=args.image_size if args.crop == 'published' else None, oe_x=None, mixing=None)
    tensor = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    if in_memory:  # the whole set on the training device: no loader, no workers
        data.update(train_x=tensor(ds['train'][0]), train_y=torch.from_numpy(ds['train'][1]).to(device),
                    val_x=tensor(ds['val'][0]), val_y=torch.from_numpy(ds['val'][1]).to(device))
        if syn_y is not None:
            data.update(syn_x=tensor(syn_x), syn_y=torch.from_numpy(syn_y).to(device))
    else:
        data.update(folder_set=FolderImages(*ds['train'], args.image_size, True, syn_x, syn_y), val_x=ds['val'][0],
                    val_y=ds['val'][1])
    if args.method == 'oe':
        data['oe_x'] = tensor(load_outlier_images(args.oe_data, size))
    if args.method == 'pixmix':  # pictures 36/32 of the crop (OpenOOD's Resize(36), RandomCrop(32)); 256 for 224
        crop = args.image_size if data['crop_size'] or not in_memory else size
        pictures = load_mixing_set(args.mixing_set, round(crop * (256 / 224 if not in_memory else 36 / 32)))
        data['mixing'] = [t.to(device) for t in pictures]
    plan = sio_batches(data['n_real'], data['n_syn'], args.batch_size, args.alpha, torch.Generator().manual_seed(0))
    data['real_seen'], n_real, n_syn = sum(len(r) for r, _ in plan), data['n_real'], data['n_syn']
    if rank == 0 and n_syn:
        print(f'SIO: {len(plan[0][0])} real + {len(plan[0][1])} synthetic per batch of {args.batch_size} (alpha '
              f'{args.alpha}); {len(plan)} batches/epoch use {data["real_seen"]:,} of {n_real:,} real images '
              f'({100 * data["real_seen"] / n_real:.1f}%), draw {len(plan) * len(plan[0][1]):,} of {n_syn:,} synthetic')
    elif rank == 0:
        print(f'baseline: {n_real:,} real images, {len(plan)} batches/epoch of {args.batch_size}')
    flags = RUN_FLAGS + METHOD_FLAGS.get(args.method, ())  # what the result depends on: --resume must match
    data['run'] = {k: os.path.abspath(v) if k in ('openood_root', 'synthetic', 'oe_data', 'mixing_set') and v else v
                   for k, v in vars(args).items() if k in flags and (k != 'classes' or v is not None)}
    data['run']['synthetic set'] = dict(images=n_syn, meta=meta) if n_syn else None
    if not in_memory:  # a folder's labels are its class list's positions; its crops come from the loader's workers
        data['run'].update(workers=args.workers, class_list=ds['classes'])
    return data

def start(args, data, seed, out, resume, device):  # the seeded model, optimiser and cosine, or the run in out/last.pt
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    model = Net(args.arch, len(data['ds']['classes'])).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=args.nesterov,
                                weight_decay=args.weight_decay)
    total, floor = args.epochs * math.ceil(data['n_real'] / args.batch_size), MIN_LR / args.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / total)))
    if not resume:
        if args.resume:
            print(f'--resume: no {out}/last.pt yet, starting at epoch 1')
        return model, optimizer, scheduler, dict(epoch=0, best_val_acc=-1.0, log=[])
    fix = f'pass --overwrite --seed {seed} to start it afresh, or another --out'  # that seed alone
    state = read_checkpoint(out / 'last.pt', '--resume:', fix)
    if state.get('method') == 'oal' or 'optimizer' not in state:
        fail(f'--resume: {out}/last.pt holds a train_oal.py run, not a train_sio.py one: pass another --out')
    try:
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        intact = resumable(state, args, optimizer)
    except (KeyError, TypeError, ValueError, RuntimeError):
        intact = False
    if not intact:
        fail(f'--resume: {out}/last.pt is damaged (epoch, log or optimizer state): {fix}')
    return model, optimizer, scheduler, state

def resumable(state, args, optimizer):  # whether last.pt's epoch, log and learning rates are what these settings save
    return (type(state['epoch']) is int and 1 <= state['epoch'] <= args.epochs and isinstance(state['log'], list)
            and isinstance(state['best_val_acc'], float) and len(state['log']) == state['epoch']
            and all(isinstance(g['lr'], float) and math.isfinite(g['lr']) for g in optimizer.param_groups))

def batches(args, data, plan, device, rank, world):  # this rank's share of every planned batch, in the same proportion
    if not data['in_memory']:  # image folders: decoded and cropped by the DataLoader's workers
        sampler = [torch.cat([r[rank::world], s[rank::world] + data['n_real']]).tolist() for r, s in plan]
        yield from torch.utils.data.DataLoader(data['folder_set'], batch_sampler=sampler, num_workers=args.workers,
                                               pin_memory=device.type == 'cuda', worker_init_fn=ignore_interrupts)
        return
    for real, syn in plan:
        real, syn = real[rank::world].to(device), syn[rank::world].to(device)
        x, y = data['train_x'][real], data['train_y'][real]
        yield (torch.cat([x, data['syn_x'][syn]]), torch.cat([y, data['syn_y'][syn]])) if data['n_syn'] else (x, y)

def train_epoch(args, data, net, optimizer, scheduler, seed, epoch, out, device, rank, world):
    """One epoch, every draw seeded by (seed, epoch, rank): a resume repeats it; all ranks share one batch plan."""
    torch.manual_seed((seed * 1000 + epoch) * 1000 + rank)
    np.random.seed(((seed * 1000 + epoch) * 1000 + rank) % 2 ** 32)
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    plan = sio_batches(data['n_real'], data['n_syn'], args.batch_size, args.alpha, generator)
    oe_x, oe_size = data['oe_x'], args.oe_batch_size
    if oe_x is not None:  # OpenOOD's outlier loader: reshuffled each epoch, and again whenever it runs out
        oe_order = draw(len(oe_x), len(plan) * oe_size, generator)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else nullcontext()
    net.train()
    t0, seen, loss_sum, correct = time.time(), 0, torch.zeros((), device=device), torch.zeros((), device=device)
    bar = tqdm(batches(args, data, plan, device, rank, world), total=len(plan), desc=f'epoch {epoch + 1}/{args.epochs}',
               disable=rank != 0, leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
        order = torch.randperm(len(y), device=device)  # real and synthetic shuffled within the batch
        x, y = x[order], y[order]
        x = augment(x, args.pad, args.flip, data['crop_size']) if data['in_memory'] else augment(x, 0, args.flip)
        if data['mixing'] is not None:  # PixMix after the crop and flip, on real and synthetic images alike
            x = pixmix(x, random_crops(data['mixing'], len(x), x.shape[-1]), args.pixmix_k, args.pixmix_beta,
                       args.aug_severity, args.pixmix_ops == 'all')
        x, mix_labels, lam = cutmix(x, y) if args.method == 'cutmix' else (x, None, 1.0)
        if oe_x is not None and args.oe_augment:  # deviation (--oe-augment): augmented, drawn with replacement
            x = torch.cat([x, augment(oe_x[torch.randint(len(oe_x), (oe_size // world,), device=device)], args.pad,
                                      args.flip, data['crop_size'])])
        elif oe_x is not None:  # faithful (OpenOOD's OE trainer): test transform, the next outliers in order
            x = torch.cat([x, augment(oe_x[oe_order[step * oe_size:(step + 1) * oe_size][rank::world].to(device)], 0,
                                      False, data['crop_size'])])
        with autocast:
            logits = net(normalize(x, data['ds']['mean'], data['ds']['std'], args.image_size))
            loss = method_loss(args.method, logits.float(), y, args.tau, args.oe_weight, mix_labels, lam)
        check_finite(loss, epoch, step, out, world, lambda: f'lower --lr {args.lr:g}'
                     + f', raise --tau {args.tau:g}' * (args.method == 'logitnorm') + ', or check the data')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits[:len(y)].argmax(1) == y).sum()
        seen += len(y)
        if step % 20 == 0:
            bar.set_postfix(loss=f'{loss.item():.3f}', img_s=f'{seen * world / (time.time() - t0):.0f}')
    stats, seconds = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)]), time.time() - t0
    if world > 1:
        dist.all_reduce(stats)
    return dict(loss=(stats[0] / stats[2]).item(), train_acc=(stats[1] / stats[2]).item(), seconds=seconds,
                synthetic_seen=sum(len(s) for _, s in plan), images_per_s=stats[2].item() / seconds)

def check_finite(loss, epoch, step, out, world, fix):  # a NaN/inf loss stops every rank at once, one line naming fix()
    finite = torch.isfinite(loss).float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite:
        kept = f'{out}/last.pt holds epoch {epoch}, the last good one' if epoch else 'nothing was saved'
        fail(f'loss is {loss.item()} at epoch {epoch + 1} step {step + 1}; {kept} ({fix()})')

def end_epoch(args, data, model, optimizer, scheduler, state, stats, val_acc, seed, epoch, out):
    """The epoch's log row; best.pt when validation accuracy improved, last.pt (all a resume needs), log."""
    row = dict(epoch=epoch, loss=stats['loss'], train_acc=stats['train_acc'], val_acc=val_acc,
               lr=scheduler.get_last_lr()[0], real_seen=data['real_seen'], synthetic_seen=stats['synthetic_seen'],
               images_per_s=stats['images_per_s'], seconds=stats['seconds'])
    state['log'].append(row)
    print(f"{epoch:>5} {row['loss']:>8.4f} {100 * row['train_acc']:>6.2f}% {100 * val_acc:>6.2f}% "
          f"{row['images_per_s']:>8.0f} {row['seconds']:>6.1f}")
    ds = data['ds']
    ckpt = dict(model=model.state_dict(), arch=args.arch, num_classes=len(ds['classes']), classes=ds['classes'],
                dataset=args.dataset, image_size=args.image_size, mean=ds['mean'], std=ds['std'], epoch=epoch,
                val_acc=val_acc, args=dict(vars(args), seed=seed, out=str(out)),
                method='sio' if data['n_syn'] else args.method)
    if val_acc > state['best_val_acc']:
        state['best_val_acc'] = val_acc
        write_atomic(out / 'best.pt', lambda tmp: torch.save(ckpt, tmp))
    rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    last = dict(ckpt, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=None,  # bf16: none
                best_val_acc=state['best_val_acc'], run=dict(data['run'], seed=seed), log=state['log'], rng=rng)
    write_atomic(out / 'last.pt', lambda tmp: torch.save(last, tmp))
    write_log(state['log'], out)
    STATUS['kept'] = f'{out}/last.pt holds epoch {epoch} of {args.epochs}'

def write_log(rows, out):
    write_atomic(out / 'log.jsonl', lambda tmp: Path(tmp).write_text(''.join(json.dumps(r) + '\n' for r in rows)))

def train(args, data, seed, out, resume, device, rank, world):  # one run of seed into out, exactly as if started alone
    model, optimizer, scheduler, state = start(args, data, seed, out, resume, device)
    if resume and rank == 0:  # the rows travel inside last.pt too: a kill between the two writes loses none
        print(f'resumed from {out}/last.pt after epoch {state["epoch"]} (best val acc '
              f'{100 * state["best_val_acc"]:.2f}%)')
        write_log(state['log'], out)
    net = torch.compile(model) if args.compile else model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == 'cuda' else None)
    stop = args.epochs if args.stop_after is None else min(args.epochs, state['epoch'] + args.stop_after)
    if rank == 0:
        print(f"{'epoch':>5} {'loss':>8} {'train':>7} {'val':>7} {'img/s':>8} {'sec':>6}")
    for epoch in range(state['epoch'], stop):
        stats = train_epoch(args, data, net, optimizer, scheduler, seed, epoch, out, device, rank, world)
        val_acc = accuracy(model, data['val_x'], data['val_y'], args, data['ds'], device, rank, world)
        if rank == 0:
            end_epoch(args, data, model, optimizer, scheduler, state, stats, val_acc, seed, epoch + 1, out)
    if rank == 0 and stop == args.epochs:
        finish(out)
    if rank == 0:
        print(f'best val acc {100 * state["best_val_acc"]:.2f}% -> {out}/best.pt'
              + ('' if stop == args.epochs else f' (after epoch {stop}: continue with --resume)'))


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


# Synthetic ID sets: images.npy + labels.npy, or <class index, zero-padded>/<n>.png + meta.json.

def load_npy(file, mmap_mode=None):  # one line for a truncated or pickled (object) array; mmap_mode='r': read as used
    try:
        return np.load(file, mmap_mode=mmap_mode)  # allow_pickle=False: an object array is refused, not unpickled
    except (ValueError, OSError, EOFError) as e:
        fail(f'{file} cannot be read as a numeric .npy ({e}): write it again (the generate.py command that made it)')

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

def check_set(path, flag, dataset, classes, command):
    """A generate.py folder checked before use: finished, made for these classes and dataset, as far as its manifest and
    meta.json say (SIO's released npy pair has neither and is taken as it is). Returns meta.json's content or None."""
    path = Path(path)
    if path.is_file():
        fail(f'{flag} takes the folder that holds {path.name}: pass {path.parent}')
    if not path.is_dir():
        fail(f'{flag} {path} does not exist: make it with generate.py {command} (or pass the folder that holds it)')
    redo = f'rerun the generate.py {command} command that made {path}'
    manifest = read_json(path / MANIFEST, redo) if (path / MANIFEST).exists() else {}
    meta = read_json(path / 'meta.json', redo) if (path / 'meta.json').exists() else None
    if manifest.get('complete', True) is not True or (meta or {}).get('complete', True) is not True:
        counts = (meta or {}).get('counts')
        so_far = f'{sum(counts)} images so far; ' if all(type(c) is int for c in counts or [None]) else ''
        fail(f'{path} is unfinished ({so_far}no completion record): rerun generate.py {command} as before (it resumes)')
    if (meta or {}).get('classes', list(classes)) != list(classes):
        fail(f'{path} was generated for classes {str(meta["classes"])[:40]}... but --dataset {dataset} has '
             f'{classes[:4]}...: generate it for this --dataset')
    if (meta or {}).get('dataset', dataset) != dataset and not dataset.startswith('folder:'):
        fail(f'{path} was generated for --dataset {meta["dataset"]}, not {dataset}: generate it for this --dataset')
    return meta and dict(meta, made_with=manifest.get('settings'))  # made again otherwise: another set to --resume

def load_synthetic(path, dataset, classes, size, on_disk=False, device_name='cpu'):
    """A synthetic ID set's images and labels (check_set has seen its folder), checked against the real set. on_disk
    (folder datasets): file names, or images.npy memory-mapped, read by the loader's workers as used."""
    num_classes, path, files = len(classes), Path(path), None
    if (path / 'images.npy').exists():
        if not (path / 'labels.npy').exists():
            fail(f'{path}/images.npy has no labels.npy beside it: pass the folder that holds both')
        images, labels = load_npy(path / 'images.npy', 'r'), load_npy(path / 'labels.npy')
    else:
        class_dirs = sorted(d for d in path.iterdir() if d.is_dir())
        if not class_dirs or not all(re.fullmatch('[0-9]+', d.name) for d in class_dirs):
            fail(f'{path} holds no synthetic set: expected images.npy+labels.npy or class folders named 000, 001, ...')
        entries = [(f, int(d.name), f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
                   for d in class_dirs for f in sorted(d.iterdir())]
        chosen = [(str(f), c) for f, c, image in entries if image]
        if skipped := [f for f, _, image in entries if not image]:  # a class folder's images lie in it, not deeper
            print(f'note: {len(skipped)} entries in {path} are not images (or are folders) and are skipped (e.g. '
                  f'{skipped[0]})', file=sys.stderr)
        files, labels = [f for f, _ in chosen], np.array([c for _, c in chosen], dtype=np.int64)
        images = np.zeros((len(files), 1, 1, 3), np.uint8)  # a stand-in of the right length for the checks
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape[1:3]:
        fail(f'{path}: synthetic images must be uint8 (N, H, W, 3) with H, W >= 1, got {images.dtype} {images.shape}')
    if labels.ndim != 1 or len(labels) != len(images) or len(images) == 0:
        fail(f'{path}: need one label per image, got {len(labels)} labels for {len(images)} images')
    if not (labels.dtype.kind in 'iu' or labels.dtype.kind == 'f' and np.isfinite(labels).all()
            and (labels == np.round(labels)).all()):
        fail(f'{path}: synthetic labels must be whole class indices, got {labels.dtype} labels with NaN or fractions')
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        fail(f'{path}: synthetic labels span {labels.min()}..{labels.max()} but the dataset has {num_classes} classes '
             f'(0..{num_classes - 1})')
    if missing := sorted(set(range(num_classes)) - set(np.unique(labels).tolist())):
        fail(f'{path}: synthetic set has {num_classes - len(missing)} classes, --dataset {dataset} has {num_classes} '
             f'(no image for class {", ".join(map(str, missing[:5]))}{"..." * (len(missing) > 5)}): '
             f'generate it for this --dataset')
    if on_disk:  # decoded and cropped by the loader's workers, like the real images
        return (files if files is not None else images), labels
    check_memory(len(labels) * (images[0].size + 2 * size * size * 3), f'{path} in memory at {size}x{size}',
                 'pass a smaller set, or train on a machine with more memory', device_name)
    return resize_images(read_images(files, size) if files is not None else np.array(images), size), labels

def resize_images(images, size):  # uint8 (N, H, W, 3) -> uint8 (N, size, size, 3), antialiased bilinear, in chunks
    if images.shape[1:3] == (size, size):
        return images
    resized = [F.interpolate(torch.from_numpy(images[i:i + 256]).permute(0, 3, 1, 2).float(), size=(size, size),
                             mode='bilinear', antialias=True, align_corners=False) for i in range(0, len(images), 256)]
    return torch.cat(resized).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()

def image_files(path):  # every image file under a folder, recursively, as sorted strings ([] when it is no folder)
    files = Path(path).rglob('*') if Path(path).is_dir() else []
    return sorted(str(f) for f in files if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())

def load_outlier_images(path, size):
    """Outlier images for OE: a .npy of uint8 (N, H, W, 3) or any folder of images (searched recursively)."""
    if str(path).endswith('.npy') and Path(path).is_file():
        images = load_npy(path)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape:
            fail(f'{path}: outlier images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}')
        return resize_images(images, size)
    if not (files := image_files(path)):
        fail(f'--oe-data {path}: no images found (pass a .npy of uint8 images or a folder of image files)')
    return read_images(files, size)

def load_mixing_set(path, size):
    """PixMix's mixing pictures: every image in a folder, the shorter side resized to size (OpenOOD's Resize; the longer
    one truncated), kept whole so a step crops anywhere: (all pixels, HWC, one after another; (N, 2) sizes; offsets)."""
    from PIL import Image
    if not (files := image_files(path)):
        fail(f'--mixing-set {path}: no images found; pass a folder of images (e.g. PixMix\'s fractals_and_fvis)')
    pictures = []
    for f in files:
        image = Image.fromarray(read_image(f))
        w, h = image.size
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        pictures.append(np.asarray(image if new == (w, h) else image.resize(new, Image.BILINEAR)))
    offsets = np.cumsum([0] + [p.size for p in pictures[:-1]])
    flat = torch.from_numpy(np.concatenate([p.reshape(-1) for p in pictures]))
    return flat, torch.tensor([p.shape[:2] for p in pictures]), torch.from_numpy(offsets)

def augment(x, pad, flip, size=None):
    """Random zero-padded crop + horizontal flip per image, uint8 on x's device. With size, resized to it first, so
    the crop shifts by +-pad pixels at that size: OpenOOD's Resize(224), RandomCrop(224, padding=4), as OAL trained."""
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x.float(), size=size, mode='bilinear', align_corners=False).round().clamp(0, 255).byte()
    n, _, h, w = x.shape
    if pad:
        dy, dx = (torch.randint(0, 2 * pad + 1, (n, 1), device=x.device) for _ in 'yx')
        rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
        x = F.pad(x, (pad, pad, pad, pad))[torch.arange(n, device=x.device)[:, None, None, None],
                                          torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x

class FolderImages(torch.utils.data.Dataset):
    """Real image files then synthetic ones (files or a memory-mapped images.npy), read as uint8 CHW in the workers."""

    def __init__(self, files, labels, size, train, extra_images=None, extra_labels=None):
        if isinstance(extra_images, list):  # synthetic image files: read like the real ones
            files, labels, extra_images = list(files) + extra_images, np.concatenate([labels, extra_labels]), None
        self.files, self.labels, self.extra_images, self.extra_labels = files, labels, extra_images, extra_labels
        import torchvision.transforms as t
        self.transform = (t.RandomResizedCrop(size) if train else
                          t.Compose([t.Resize(int(size * 256 / 224)), t.CenterCrop(size)]))

    def __len__(self):
        return len(self.files) + (0 if self.extra_images is None else len(self.extra_images))

    def __getstate__(self):  # workers started by spawn reopen the memory map rather than receive every image
        state = dict(self.__dict__)
        if isinstance(self.extra_images, np.memmap):
            state['extra_images'] = self.extra_images.filename
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if isinstance(self.extra_images, (str, Path)):
            self.extra_images = np.load(self.extra_images, mmap_mode='r')

    def __getitem__(self, i):
        from PIL import Image
        n = len(self.files)
        image = read_image(self.files[i]) if i < n else self.extra_images[i - n]
        label = self.labels[i] if i < n else self.extra_labels[i - n]
        return torch.from_numpy(np.array(self.transform(Image.fromarray(image)))).permute(2, 0, 1), int(label)


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

@torch.no_grad()
def accuracy(model, images, labels, args, ds, device, rank=0, world=1):  # top-1 of this rank's share, summed over ranks
    model.eval()
    correct = torch.zeros(2, device=device)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else nullcontext()
    if isinstance(images, torch.Tensor):
        idx = torch.arange(rank, len(images), world)
        batches = ((images[idx[i:i + 512]], labels[idx[i:i + 512]]) for i in range(0, len(idx), 512))
    else:
        subset = torch.utils.data.Subset(FolderImages(images, labels, args.image_size, False),
                                         range(rank, len(images), world))
        batches = torch.utils.data.DataLoader(subset, batch_size=256, num_workers=args.workers,
                                              worker_init_fn=ignore_interrupts)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device)
        with autocast:
            pred = model(normalize(x, ds['mean'], ds['std'], args.image_size)).argmax(1)
        correct += torch.stack([(pred == y).sum(), torch.tensor(len(y), device=device)])
    if world > 1:
        dist.all_reduce(correct)
    model.train()
    return (correct[0] / correct[1]).item()


# ------------------------------------------------------------------------------------------------
# Arguments

def seeds(text):  # --seed 0, or several distinct seeds: 0,1,2
    parts = text.split(',')
    if not all(p.strip().isdigit() and int(p) < 2 ** 31 for p in parts) or len(set(map(int, parts))) < len(parts):
        raise argparse.ArgumentTypeError(f'must be an integer in [0, 2**31) or distinct ones (0,1,2), got {text!r}')
    return [int(p) for p in parts]

def template(flag, text, allowed):  # a template's {fields}, each one of allowed ('' is {}), else one line; {{ is a {
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(text)]
    except ValueError as e:
        fields = [(str(e), None, None)]
    if any(name is not None and (name not in allowed or spec or conversion) for name, spec, conversion in fields):
        fail(f'{flag} {text!r} may hold only {" ".join("{" + a + "}" for a in allowed)} as fields: write a literal '
             f'brace as {{{{ or }}}}')
    return [name for name, _, _ in fields if name is not None]

def get_args(argv=None):
    p = Parser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', default='digits', help='digits | cifar10 | cifar100 | folder:PATH')
    p.add_argument('--classes', help="folder datasets: imagenet-10, imagenet-dogs (the SIO code's) or a class list")
    p.add_argument('--data-root', default='./data', help='where torchvision datasets live or are downloaded to')
    p.add_argument('--openood-root', help="OpenOOD's data folder (benchmark_imglist/, images_classic/): its lists")
    p.add_argument('--arch', choices=ARCH_SIZE, help='default: cnn (digits), resnet18 (CIFAR), resnet18_224 (folders)')
    p.add_argument('--image-size', type=POSITIVE, help='train/test resolution (default: native for the arch)')
    p.add_argument('--crop', default='published', choices=['published', 'native'],
                   help='above native size: resize, then flip and pad-crop there (OpenOOD); native: crop, then resize')
    p.add_argument('--synthetic', help='synthetic ID set: a folder of images.npy + labels.npy or class folders 000/...')
    p.add_argument('--alpha', type=number(float, 'in (0, 1]', lambda v: 0 < v <= 1),
                   help='share of real images per batch (0.8 CIFAR, 0.9 folders); 1 = baseline')
    p.add_argument('--method', default='ce', choices=['ce', 'logitnorm', 'oe', 'cutmix', 'pixmix'])
    p.add_argument('--tau', type=RATE, default=0.04, help='LogitNorm temperature')
    p.add_argument('--oe-data', help='outlier images for --method oe: a .npy (N, H, W, 3) uint8 or an image folder')
    p.add_argument('--oe-weight', type=WEIGHT, default=0.5)
    p.add_argument('--oe-batch-size', type=POSITIVE, help='outliers per step (default 2x the batch, as OE)')
    p.add_argument('--oe-augment', action='store_true', help='deviation: outliers augmented, drawn with replacement')
    p.add_argument('--mixing-set', help="PixMix's mixing pictures for --method pixmix: a folder of images")
    p.add_argument('--pixmix-k', type=NATURAL, default=4, help='PixMix: at most this many mixing rounds per image')
    p.add_argument('--pixmix-beta', type=RATE, default=3.0, help='PixMix: mixing severity (its Beta distributions)')
    p.add_argument('--aug-severity', type=number(int, 'an integer in 1..10', lambda v: 1 <= v <= 10), default=3,
                   help='PixMix: severity of the AugMix operations')
    p.add_argument('--pixmix-ops', default='all', choices=['all', 'base'],
                   help="all 13 AugMix ops (the SIO code); base: 9, as PixMix's CIFAR script")
    for flag, kind in (('--epochs', POSITIVE), ('--batch-size', POSITIVE), ('--lr', RATE), ('--weight-decay', WEIGHT)):
        p.add_argument(flag, type=kind, help="default: the dataset's recipe (RECIPES)")
    p.add_argument('--seed', type=seeds, default='0', help='an integer or several (0,1,2): a run each, {seed} in --out')
    p.add_argument('--out', help='run folder (default runs/<dataset>_<method>[_sio]_s{seed})')
    p.add_argument('--resume', action='store_true', help='continue the run in --out (from scratch without last.pt)')
    p.add_argument('--overwrite', action='store_true', help='start afresh over the run in --out')
    p.add_argument('--stop-after', type=POSITIVE, help='leave after this many epochs (--resume continues)')
    p.add_argument('--device', type=device, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument('--workers', type=NATURAL, default=8, help='DataLoader workers (image folders only)')
    args = p.parse_args(argv)
    if args.alpha not in (None, 1) and not args.synthetic:
        fail('--alpha is the share of real images beside --synthetic images: pass --synthetic PATH too, or drop it')
    if given := [(m, k) for m, keys in METHOD_FLAGS.items() for k in keys
                 if m != args.method and getattr(args, k) != p.get_default(k)]:
        fail(f"--{given[0][1].replace('_', '-')} is for --method {given[0][0]} only, not --method {args.method}: "
             f'drop it, or pass --method {given[0][0]}')
    kind = 'digits' if args.dataset == 'digits' else 'folder' if args.dataset.startswith('folder:') else 'cifar'
    vars(args).update({key: value for key, value in RECIPES[kind].items() if getattr(args, key, None) is None})
    args.arch = args.arch or {'digits': 'cnn', 'cifar': 'resnet18', 'folder': 'resnet18_224'}[kind]
    args.alpha = args.alpha if args.synthetic else 1.0
    world = world_size()
    for flag, value in (('--batch-size', args.batch_size), ('--oe-batch-size', args.oe_batch_size)):
        if value is not None and value < world:
            fail(f'{flag} must be an integer >= {world} (the number of processes), got {value}')
    if args.synthetic and int(args.batch_size * args.alpha) < world:
        fail(f'--alpha {args.alpha} leaves {int(args.batch_size * args.alpha)} real images in a batch of '
             f'{args.batch_size}: raise --alpha or --batch-size')
    if args.classes and kind != 'folder':
        fail(f'--classes is for folder:PATH datasets; --dataset {args.dataset} has fixed classes: drop --classes')
    if args.method == 'oe' and not args.oe_data:
        fail('--method oe needs outlier images: pass --oe-data PATH (a .npy of uint8 images or an image folder)')
    if args.method == 'pixmix' and not args.mixing_set:
        fail("--method pixmix needs mixing pictures: pass --mixing-set PATH (e.g. PixMix's fractals_and_fvis)")
    if args.resume and args.overwrite:
        fail('--resume continues the run in --out and --overwrite starts it afresh: pass one of them')
    if args.out is None:
        args.out = f"runs/{re.sub('[:/]', '_', args.dataset)}_{args.method}{'_sio' if args.synthetic else ''}_s{{seed}}"
    if 'seed' not in template('--out', args.out, ['seed']) and len(args.seed) > 1:
        fail(f'--seed {",".join(map(str, args.seed))}: a run each needs {{seed}} in --out (e.g. {args.out}_s{{seed}})')
    if len({os.path.realpath(args.out.format(seed=s)) for s in args.seed}) < len(args.seed):  # 'x{seed}/..', links
        fail(f'--out {args.out} names one folder for several seeds: put {{seed}} in the folder name')
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
    with user_errors(argv, add=['--resume'], drop=['--overwrite']):
        rank, world, device = setup_distributed(args.device)
        if device.type == 'cuda':  # fixed input sizes: cuDNN picks its fastest kernels; TF32 matmuls
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        data = prepare(args, device, rank)
        outs = {seed: Path(args.out.format(seed=seed)) for seed in args.seed}
        inputs = [('--synthetic set', args.synthetic), ('--oe-data', args.oe_data), ('--mixing-set', args.mixing_set),
                  ('--openood-root', args.openood_root)]

        def claim_runs():  # every seed's folder checked, then each taken, before the first step: none refused half-way
            run = {('--' + k.replace('_', '-') if k in vars(args) else k): v for k, v in data['run'].items()}
            for dry in (True, False):
                taken = {seed: claim(out, '--out', 'train_sio.py', dict(run, **{'--seed': seed}), args.overwrite,
                                     args.resume, 'a run', 'pass --resume to continue it, --overwrite to start afresh, '
                                     'or another --out', inputs, dry) for seed, out in outs.items()}
            return {seed: 'last.pt' in set(manifest['files']) - set(manifest['stale'])
                    and (outs[seed] / 'last.pt').exists() for seed, manifest in taken.items()}
        resumable = on_rank0(rank, world, claim_runs)

        def read_later():  # a damaged last.pt of a later seed: found now, not after the seeds before it have trained
            for seed in [s for s in outs if resumable[s] and args.resume][1:]:
                start(args, data, seed, outs[seed], True, torch.device('cpu'))
        on_rank0(rank, world, read_later)
        for seed, out in outs.items():
            if len(outs) > 1 and rank == 0:
                print(f'== seed {seed} -> {out}')
            train(args, data, seed, out, resumable[seed] and args.resume, device, rank, world)
        if world > 1:
            dist.destroy_process_group()

if __name__ == '__main__':
    main()
