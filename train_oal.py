"""OAL: train an OOD-aware classifier with latent-space outliers, a mutual-information module and distillation.

Paper: "Enhancing OOD Detection Using Latent Diffusion" (Outlier-Aware Learning), Gao et al., arXiv 2406.16525
(code: HengGao12/OAL, a fork of OpenOOD). Idea: outliers synthesized in Stable Diffusion's latent space (generate.py
oal) are cheap and few; CLUB upper bounds on the mutual information between outliers and the student's ID features
push the two apart (MICL), and distillation from a strong frozen teacher keeps ID accuracy from dropping.

    L = CE + 4 KL(p_t || p_s) + 8 KL(softmax(DT(h_t)) || softmax(h_s)) + 0.1 CLUB(o_knn, h_s) + 0.2 CLUB(o_diff, h_s)

    python train_oal.py --dataset digits         # teacher and init runs/digits_ce_s0, outliers outliers/digits
    python train_oal.py --dataset digits --seed 0,1,2 --init 'runs/digits_ce_s{seed}' --out 'runs/digits_oal_s{seed}'
    python train_oal.py --dataset cifar10 --init runs/cifar100_ce_224   # teacher: TEACHERS (the authors' timm ViT-B/16)
    python train_oal.py --dataset cifar10 --club alternating            # the CLUB estimator as designed
    python train_oal.py --dataset cifar10 --w-knn 0 --w-diff 0          # ablation: distillation only
    torchrun --nproc_per_node=4 train_oal.py --dataset cifar100 ...
    python evaluate.py runs/<dataset>_oal_s0 --detectors ebo            # evaluate with the paper's score
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

RECIPES = {'digits': dict(epochs=30, batch_size=64, pad=1, flip=False),  # the paper's at 224: 100 epochs, B 128
           'cifar': dict(epochs=100, batch_size=128, pad=4, flip=True)}
MIN_LR = 1e-8  # OAL's per-iteration cosine ends at 1e-8 for the student (every group scaled by the same factor)
TERMS = ('loss', 'ce', 'kd', 'feat', 'club_knn', 'club_diff')  # the loss and its parts, as logged
TEACHERS = {  # OAL's teacher: a timm ViT-B/16 (ImageNet-21k) fine-tuned on the ID set at 224, from the hub
    'cifar10': 'edadaltocg/vit_base_patch16_224_in21k_ft_cifar10',  # the authors' file; model card: 98.96%
    'cifar100': 'edadaltocg/vit_base_patch16_224_in21k_ft_cifar100'}  # theirs is unpublished: the closest; 93.16%
RUN_FLAGS = ('dataset', 'openood_root', 'teacher', 'teacher_class_order', 'teacher_norm', 'crop', 'init', 'outliers',
             'arch', 'image_size', 'w_kd', 'w_feat', 'w_knn', 'w_diff', 'club', 'epochs', 'batch_size', 'lr', 'lr_dt',
             'lr_q', 'weight_decay', 'seed')  # what a run's result depends on: --resume must match


# ------------------------------------------------------------------------------------------------
# The method: the DT adapter (teacher feature -> student feature space), CLUB, and the OAL objective.

def dt_adapter(d_t, d_s):
    return nn.Sequential(nn.BatchNorm1d(d_t), nn.Linear(d_t, d_s), nn.ReLU(), nn.BatchNorm1d(d_s))

class CLUB(nn.Module):
    """CLUB (Cheng et al. 2020): an upper bound of I(x; y) with a Gaussian q(y|x) = N(mu(x), exp(logvar(x)))."""

    def __init__(self, d_x, d_y, deep_mu=False):
        super().__init__()
        # OAL's diffusion-outlier CLUB (DEEP_CLUB) has a deeper mean network: d_x, d_x/2, d_x/4, 256, d_y
        half, quarter = max(d_x // 2, 1), max(d_x // 4, 1)
        self.mu = (nn.Sequential(nn.Linear(d_x, half), nn.ReLU(), nn.Linear(half, quarter), nn.ReLU(),
                                 nn.Linear(quarter, 256), nn.ReLU(), nn.Linear(256, d_y))
                   if deep_mu else nn.Sequential(nn.Linear(d_x, 256), nn.ReLU(), nn.Linear(256, d_y)))
        self.logvar = nn.Sequential(nn.Linear(d_x, 256), nn.ReLU(), nn.Linear(256, d_y), nn.Tanh())

    def forward(self, x, y):
        """mean_i (pos_i - neg_i): pos_i = -sum_d (mu_i - y_i)^2 / 2 var_i,
        neg_i = -sum_d mean_j (y_j - mu_i)^2 / 2 var_i."""
        mu, logvar = self.mu(x), self.logvar(x)
        pos = -((mu - y) ** 2 / 2 / logvar.exp()).sum(1)
        neg = -(((y[None, :, :] - mu[:, None, :]) ** 2).mean(1) / 2 / logvar.exp()).sum(1)
        return (pos - neg).mean()

    def log_likelihood(self, x, y):  # what q maximises (alternating): -sum (mu - y)^2 / var - sum logvar, batch mean
        mu, logvar = self.mu(x), self.logvar(x)
        return (-((mu - y) ** 2) / logvar.exp() - logvar).sum(1).mean()

def kl_teacher_student(student_logits, teacher_logits):  # KL(softmax(teacher) || softmax(student)), batchmean, T = 1
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1), reduction='batchmean')

def oal_loss(z_s, h_s, y, z_t, dt_h_t, o_knn, o_diff, club_knn, club_diff, args):  # -> (total, {term: value})
    terms = dict(ce=F.cross_entropy(z_s, y), kd=kl_teacher_student(z_s, z_t),
                 feat=kl_teacher_student(h_s, dt_h_t),  # softmax over feature dims; DT(h_t) not detached (faithful)
                 club_knn=club_knn(o_knn, h_s), club_diff=club_diff(o_diff, h_s))
    total = (terms['ce'] + args.w_kd * terms['kd'] + args.w_feat * terms['feat'] + args.w_knn * terms['club_knn']
             + args.w_diff * terms['club_diff'])
    return total, terms

def fit_q_step(optimizer, club_knn, club_diff, o_knn, o_diff, h_s, world=1):
    """--club alternating: one ascent step of q's log-likelihood on detached features (SGD skips the gradless rest)."""
    optimizer.zero_grad(set_to_none=True)
    loss = -(club_knn.log_likelihood(o_knn, h_s.detach()) + club_diff.log_likelihood(o_diff, h_s.detach()))
    loss.backward()
    average_gradients([club_knn, club_diff], world)
    optimizer.step()
    return -loss.detach()

def distinct(pool_size, n, device):
    """n random indices, distinct while the pool lasts (OAL: torch.randperm(pool)[:n]); a small pool is redrawn."""
    return torch.cat([torch.randperm(pool_size, device=device) for _ in range(-(-n // pool_size))])[:n]

def average_gradients(modules, world):  # DDP by hand for the side modules (each is called twice a step)
    if world > 1:
        for p in (p for m in modules for p in m.parameters() if p.grad is not None):
            dist.all_reduce(p.grad)
            p.grad /= world


# ------------------------------------------------------------------------------------------------
# Training in named steps: prepare (every input, once for all seeds), start (the student from its init with
# DT and CLUBs, or last.pt), train_epoch, end_epoch (checkpoints, log), train (one seed).

def prepare(args, device, rank, world):  # every input checked once for all seeds; the data as uint8 tensors on device
    ds = load_dataset(args.dataset, args.data_root, args.openood_root)
    if args.teacher == f'runs/{args.dataset}_ce_s0' and not Path(args.teacher).exists():
        fail(f'no teacher at the default {args.teacher}: train the baseline with python train_sio.py --dataset '
             f'{args.dataset} --out {args.teacher}, or pass --teacher RUN_OR_MODEL')
    stats = (ds['mean'], ds['std']) if args.teacher_norm == 'published' else None  # OAL fed its teacher these
    teacher, info = load_teacher(args.teacher, device, ds['classes'], args.teacher_class_order, stats)
    info['val_acc'] = on_rank0(rank, world, lambda: teacher_accuracy(teacher, info, *ds['val'], device,
                                                                     args.teacher_min_acc, args.dataset))
    inits = {seed: None if args.init == 'none' else args.init.format(seed=seed) for seed in args.seed}
    for seed, spec in inits.items():  # the student starts from a cross-entropy run, as the paper's
        file = run_file(spec or '.', '--init')
        if spec and not file.is_file():
            fail(f'--init {spec} not found: train the cross-entropy baseline first with python train_sio.py '
                 f'--dataset {args.dataset} --out {spec}, or pass --init none to start from scratch')
        init = inits[seed] = spec and read_checkpoint(file, '--init')
        args.arch = args.arch or (init or {}).get('arch')
        if spec and init['arch'] != args.arch:
            fail(f"--init {spec} is a {init['arch']}, not --arch {args.arch}: drop --arch or pass a matching --init")
    args.arch = args.arch or ('cnn' if args.dataset == 'digits' else 'resnet18')
    if args.image_size is None and len({init['image_size'] for init in inits.values() if init}) > 1:
        fail(f'the --init runs {args.init} were trained at different image sizes: pass --image-size, or inits of one')
    args.image_size = args.image_size or next((i['image_size'] for i in inits.values() if i), ARCH_SIZE[args.arch])
    if args.image_size < ARCH_MIN_SIZE[args.arch]:
        fail(f'--image-size must be at least {ARCH_MIN_SIZE[args.arch]} for --arch {args.arch}, got {args.image_size}')
    check_memory(4 * 3 * args.batch_size * args.image_size ** 2, f'a batch of {args.batch_size} images at '
                 f'{args.image_size}x{args.image_size}', 'pass a smaller --image-size or --batch-size', args.device)
    knn, diff, meta = load_outliers(args.outliers, args.dataset, ds['classes'], info['feature_dim'])
    tensor = lambda images: torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    n = len(ds['train'][1])  # a last batch too small for DT's BatchNorm (under 2 per process) is left out
    run = {k: os.path.abspath(v) if k in ('teacher', 'outliers', 'openood_root') and v and Path(v).exists() else v
           for k, v in vars(args).items() if k in RUN_FLAGS}
    run['teacher_stamp'] = teacher_stamp(info['name'], args.teacher)  # a retrained teacher is another teacher
    data = dict(ds=ds, teacher=teacher, info=info, inits=inits, knn=knn.to(device), diff=diff.to(device),
                train_x=tensor(ds['train'][0]), train_y=torch.from_numpy(ds['train'][1]).to(device),
                val_x=tensor(ds['val'][0]), val_y=torch.from_numpy(ds['val'][1]).to(device),
                crop_size=args.image_size if args.crop == 'published' else None, run=dict(run, **{'outlier set': meta}),
                steps=math.ceil(n / args.batch_size) - (0 < n % args.batch_size < 2 * world))
    if rank == 0:
        print(f"OAL: student {args.arch}@{args.image_size}, teacher {info['name']} ({info['feature_dim']}-d), outliers "
              f"{args.outliers}: knn {tuple(knn.shape)}, diffusion {tuple(diff.shape)}; club {args.club}")
    return data

def start(args, data, seed, out, resume, device, rank):  # student, DT, CLUBs, SGD; or the run in out/last.pt
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    num_classes, init = len(data['ds']['classes']), data['inits'][seed]
    student = Net(args.arch, num_classes)
    if init and init['dataset'] == args.dataset and init['num_classes'] == num_classes:
        student.load_state_dict(init['model'])
    elif init:  # another dataset's run lends only its backbone: OAL starts CIFAR-10 from CIFAR-100
        student.body.load_state_dict({k[len('body.'):]: v for k, v in init['model'].items() if k.startswith('body.')})
        if rank == 0:
            print(f"--init {args.init.format(seed=seed)}: backbone from its {init['dataset']} training "
                  f"({init['num_classes']} classes), classifier head initialised afresh for {num_classes} classes")
    student, d_s = student.to(device).to(memory_format=torch.channels_last), student.feature_dim
    modules = dict(model=student, dt=dt_adapter(data['info']['feature_dim'], d_s).to(device),
                   club_knn=CLUB(data['knn'].shape[1], d_s).to(device),
                   club_diff=CLUB(data['diff'].shape[1], d_s, deep_mu=True).to(device))
    q_params = [*modules['club_knn'].parameters(), *modules['club_diff'].parameters()]
    groups = [dict(params=student.parameters(), lr=args.lr), dict(params=modules['dt'].parameters(), lr=args.lr_dt),
              dict(params=q_params, lr=args.lr_q)]
    optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    total, floor = args.epochs * data['steps'], MIN_LR / args.lr  # OAL's cosine_annealing(step, total, 1, 1e-8 / lr)
    cosine = lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    if not resume:
        if args.resume:
            print(f'--resume: no {out}/last.pt yet, starting at epoch 1')
        return modules, q_params, optimizer, scheduler, dict(epoch=0, best_val_acc=-1.0, log=[])
    fix = f'pass --overwrite --seed {seed} to start it afresh, or another --out'  # that seed alone
    state = read_checkpoint(out / 'last.pt', '--resume:', fix)
    if state.get('method') != 'oal' or 'dt' not in state:
        fail(f'--resume: {out}/last.pt holds a train_sio.py run, not a train_oal.py one: pass another --out')
    try:
        for key, part in dict(modules, optimizer=optimizer, scheduler=scheduler).items():
            part.load_state_dict(state[key])
        intact = resumable(state, args, optimizer)
    except (KeyError, TypeError, ValueError, RuntimeError):
        intact = False
    if not intact:
        fail(f'--resume: {out}/last.pt is damaged (epoch, log, optimizer or scheduler): {fix}')
    return modules, q_params, optimizer, scheduler, state

def resumable(state, args, optimizer):  # whether last.pt's epoch, log and learning rates are what these settings save
    return (type(state['epoch']) is int and 1 <= state['epoch'] <= args.epochs and isinstance(state['log'], list)
            and isinstance(state['best_val_acc'], float) and len(state['log']) == state['epoch']
            and all(isinstance(g['lr'], float) and math.isfinite(g['lr']) for g in optimizer.param_groups))

def train_epoch(args, data, modules, student, q_params, optimizer, scheduler, seed, epoch, out, device, rank, world):
    """One epoch; every random draw derives from (seed, epoch, rank), so a resumed run repeats it exactly."""
    torch.manual_seed((seed * 1000 + epoch) * 1000 + rank)
    perm = torch.randperm(len(data['train_y']), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).to(device)
    dt, club_knn, club_diff = modules['dt'], modules['club_knn'], modules['club_diff']
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else nullcontext()
    student.train()
    dt.train()
    sums = {k: torch.zeros((), device=device) for k in TERMS + ('correct', 'seen')}
    t0 = time.time()
    bar = tqdm(range(data['steps']), desc=f'epoch {epoch + 1}/{args.epochs}', disable=rank != 0, leave=False,
               dynamic_ncols=True)
    for step in bar:
        idx = perm[step * args.batch_size:(step + 1) * args.batch_size][rank::world]
        x, y = augment(data['train_x'][idx], args.pad, args.flip, data['crop_size']), data['train_y'][idx]
        n = len(y)
        o_knn, o_diff = (pool[distinct(len(pool), n, device)] for pool in (data['knn'], data['diff']))  # random pairs
        with torch.no_grad(), autocast:
            z_t, h_t = data['teacher'](x)
        with autocast:
            z_s, h_s = student(normalize(x, data['ds']['mean'], data['ds']['std'], args.image_size), features=True)
        z_s, h_s, z_t, h_t = z_s.float(), h_s.float(), z_t.float(), h_t.float()
        if args.club == 'alternating':
            fit_q_step(optimizer, club_knn, club_diff, o_knn, o_diff, h_s, world)
        loss, terms = oal_loss(z_s, h_s, y, z_t, dt(h_t), o_knn, o_diff, club_knn, club_diff, args)
        bad = lambda: ', '.join(k for k, v in terms.items() if not torch.isfinite(v)) or 'the sum'
        check_finite(loss, epoch, step, out, world, lambda: f'non-finite: {bad()}; lower --lr {args.lr:g}, --lr-dt '
                     f'{args.lr_dt:g} or --lr-q {args.lr_q:g}')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.club == 'alternating':  # q stays fixed while the student minimises the bound
            for p in q_params:
                p.grad = None
        average_gradients([dt, club_knn, club_diff], world)
        optimizer.step()
        scheduler.step()
        for key, value in dict(terms, loss=loss).items():
            sums[key] += value.detach() * n
        sums['correct'] += (z_s.argmax(1) == y).sum()
        sums['seen'] += n
        if step % 20 == 0:
            bar.set_postfix(loss=f'{loss.item():.3f}', img_s=f'{sums["seen"].item() * world / (time.time() - t0):.0f}')
    stats, seconds = torch.stack(list(sums.values())), time.time() - t0
    if world > 1:
        dist.all_reduce(stats)
    totals = dict(zip(sums, stats.tolist()))
    return dict({k: totals[k] / totals['seen'] for k in TERMS + ('correct',)},
                images_per_s=totals['seen'] / seconds, seconds=seconds)

def end_epoch(args, data, modules, optimizer, scheduler, state, stats, val_acc, seed, epoch, out):
    """The epoch's log row; best.pt when validation accuracy improved, last.pt (all a resume needs), log."""
    row = dict(epoch=epoch, **{k: stats[k] for k in TERMS}, train_acc=stats['correct'], val_acc=val_acc,
               lr=scheduler.get_last_lr()[0], images_per_s=stats['images_per_s'], seconds=stats['seconds'])
    state['log'].append(row)
    print('{epoch:>5} {loss:>8.4f} {ce:>7.4f} {kd:>7.4f} {feat:>7.4f} {club_knn:>7.3f} {club_diff:>7.3f} '
          '{train_acc:>7.2%} {val_acc:>7.2%} {images_per_s:>7.0f}'.format_map(row))
    ds, info, init = data['ds'], data['info'], args.init.format(seed=seed)
    ckpt = dict(model=modules['model'].state_dict(), arch=args.arch, num_classes=len(ds['classes']),
                classes=ds['classes'], dataset=args.dataset, image_size=args.image_size, mean=ds['mean'], std=ds['std'],
                epoch=epoch, val_acc=val_acc, args=dict(vars(args), seed=seed, out=str(out), init=init), method='oal',
                teacher=dict(name=info['name'], val_acc=info['val_acc']))
    if val_acc > state['best_val_acc']:
        state['best_val_acc'] = val_acc
        write_atomic(out / 'best.pt', lambda tmp: torch.save(ckpt, tmp))
    last = dict(ckpt, **{k: m.state_dict() for k, m in modules.items() if k != 'model'},
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=None,  # bf16: no scaler
                best_val_acc=state['best_val_acc'], run=dict(data['run'], seed=seed, init=init), log=state['log'],
                rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate()))
    write_atomic(out / 'last.pt', lambda tmp: torch.save(last, tmp))
    write_log(state['log'], out)
    STATUS['kept'] = f'{out}/last.pt holds epoch {epoch} of {args.epochs}'

def train(args, data, seed, out, resume, device, rank, world):  # one seed's run, exactly as if started alone
    modules, q_params, optimizer, scheduler, state = start(args, data, seed, out, resume, device, rank)
    if resume and rank == 0:  # the rows travel inside last.pt too: a kill between the two writes loses none
        print(f'resumed from {out}/last.pt after epoch {state["epoch"]}')
        write_log(state['log'], out)
    student = torch.compile(modules['model']) if args.compile else modules['model']
    if world > 1:
        ids = [device.index] if device.type == 'cuda' else None
        student = nn.parallel.DistributedDataParallel(student, device_ids=ids)
    stop = args.epochs if args.stop_after is None else min(args.epochs, state['epoch'] + args.stop_after)
    if rank == 0:
        print(f"{'epoch':>5} {'loss':>8} {'ce':>7} {'kd':>7} {'feat':>7} {'c_knn':>7} {'c_diff':>7} {'train':>7} "
              f"{'val':>7} {'img/s':>7}")
    for epoch in range(state['epoch'], stop):
        stats = train_epoch(args, data, modules, student, q_params, optimizer, scheduler, seed, epoch, out, device,
                            rank, world)
        val_acc = top1(modules['model'], data['val_x'], data['val_y'], data['ds'], args.image_size, device, rank, world)
        if rank == 0:
            end_epoch(args, data, modules, optimizer, scheduler, state, stats, val_acc, seed, epoch + 1, out)
    if rank == 0 and stop == args.epochs:
        finish(out)
    if rank == 0:
        print(f'best val acc {100 * state["best_val_acc"]:.2f}% -> {out}/best.pt'
              + ('' if stop == args.epochs else f' (after epoch {stop}: continue with --resume)'))

def check_finite(loss, epoch, step, out, world, fix):  # a NaN/inf loss stops every rank at once, one line naming fix()
    finite = torch.isfinite(loss).float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite:
        kept = f'{out}/last.pt holds epoch {epoch}, the last good one' if epoch else 'nothing was saved'
        fail(f'loss is {loss.item()} at epoch {epoch + 1} step {step + 1}; {kept} ({fix()})')

def write_log(rows, out):
    write_atomic(out / 'log.jsonl', lambda tmp: Path(tmp).write_text(''.join(json.dumps(r) + '\n' for r in rows)))


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

def load_npy(file, mmap_mode=None):  # one line for a truncated or pickled (object) array; mmap_mode='r': read as used
    try:
        return np.load(file, mmap_mode=mmap_mode)  # allow_pickle=False: an object array is refused, not unpickled
    except (ValueError, OSError, EOFError) as e:
        fail(f'{file} cannot be read as a numeric .npy ({e}): write it again (the generate.py command that made it)')

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

def check_memory(nbytes, what, fix, device_name):  # refused up front: nbytes over the free memory (the GPU's on CUDA)
    if torch.device(device_name).type == 'cuda':
        free = torch.cuda.mem_get_info(torch.device(device_name))[0]
    else:  # Linux's estimate; elsewhere not checked
        meminfo = Path('/proc/meminfo').read_text() if Path('/proc/meminfo').exists() else 'MemAvailable: inf'
        free = float(re.search(r'MemAvailable:\s+(\S+)', meminfo).group(1)) * 1024
    if nbytes > free:
        fail(f'{what} needs {nbytes / 2 ** 30:.1f} GiB and {device_name} has {free / 2 ** 30:.1f} GiB free: {fix}')

def load_outliers(folder, dataset, classes, teacher_dim):
    """Checked outliers -> (k-NN outliers of all classes pooled (N, d), diffusion outliers (M, L), meta.json)."""
    meta = check_set(folder, '--outliers', dataset, classes, 'oal')
    knn_file, diff_file = Path(folder) / 'knn_outliers.npy', Path(folder) / 'diffusion_outliers.npy'
    if not knn_file.exists() or not diff_file.exists():
        fail(f'{folder} has no knn_outliers.npy/diffusion_outliers.npy: make them with generate.py oal --out {folder}')
    knn, diff = load_npy(knn_file), load_npy(diff_file)
    if knn.ndim != 3 or knn.shape[0] != len(classes) or knn.shape[1] == 0:
        fail(f'{knn_file} has shape {knn.shape}, expected ({len(classes)}, M >= 1, d): generate it for this --dataset')
    if knn.shape[2] != teacher_dim:
        fail(f'{knn_file} holds {knn.shape[2]}-d outliers but the teacher has {teacher_dim}-d features: generate them '
             f'with the same --teacher (generate.py oal --teacher ...)')
    if diff.ndim != 2 or 0 in diff.shape:
        fail(f'{diff_file} has shape {diff.shape}, expected (N, L) pooled latents: rerun generate.py oal')
    with np.errstate(over='ignore'):  # float64 past float32's range becomes inf, refused below
        knn, diff = [array.astype(np.float32) if array.dtype.kind == 'f' else array for array in (knn, diff)]
    for file, array in ((knn_file, knn), (diff_file, diff)):
        if array.dtype.kind != 'f' or not np.isfinite(array).all():
            fail(f'{file} must hold finite floats, got {array.dtype}{" with NaN/inf" * (array.dtype.kind == "f")}: '
                 f'rerun generate.py oal')
    return torch.from_numpy(knn.reshape(-1, knn.shape[2])), torch.from_numpy(diff), meta

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

@torch.no_grad()
def top1(model, images, labels, ds, size, device, rank=0, world=1):  # this rank's share, summed across ranks
    model.eval()
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else nullcontext()
    correct = torch.zeros(2, device=device)
    idx = torch.arange(rank, len(images), world, device=device)
    for i in range(0, len(idx), 512):
        with autocast:
            pred = model(normalize(images[idx[i:i + 512]], ds['mean'], ds['std'], size)).argmax(1)
        correct += torch.stack([(pred == labels[idx[i:i + 512]]).sum(), torch.tensor(len(pred), device=device)])
    if world > 1:
        dist.all_reduce(correct)
    model.train()
    return (correct[0] / correct[1]).item()


# ------------------------------------------------------------------------------------------------
# Teachers, the same in train_oal.py and generate.py: a run of ours, a timm ViT (hub id, hub-layout folder, bare
# state_dict or OpenOOD best.ckpt) or a transformers classifier -> forward(uint8 NCHW) -> (logits, pre-logit feature).

def offline_if_unreachable():  # without a network, hub ids load from the cache at once, not after ~25 s of retries
    import socket, urllib.parse
    import huggingface_hub.constants as hub
    try:
        socket.create_connection((urllib.parse.urlparse(hub.ENDPOINT).hostname, 443), timeout=3).close()
    except OSError:
        hub.HF_HUB_OFFLINE = True

def hub_file(spec, name):  # a file of a folder, or of a hub repo (fetched to the hub cache); None when there is none
    if Path(spec).is_dir():
        return Path(spec) / name if (Path(spec) / name).is_file() else None
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(spec, name))
    except Exception:  # not in the repo, not cached offline, no such repo
        return None

def timm_vit(spec, config):
    """A timm ViT built from config.json (the architecture without org and tag: timm's loader refuses 'timm/vit_...'
    and, given num_classes and weights, leaves a random head) or a bare state_dict's keys, loaded strictly."""
    import timm
    weights = (Path(spec) if Path(spec).is_file() else
               hub_file(spec, 'model.safetensors') or hub_file(spec, 'pytorch_model.bin'))
    if weights is None:
        fail(f'teacher {spec} has a timm config.json but no model.safetensors or pytorch_model.bin: put one beside it')
    try:
        from safetensors.torch import load_file  # a dependency of timm
        state = (load_file(weights) if weights.suffix == '.safetensors' else
                 torch.load(weights, map_location='cpu', weights_only=True))
        state = state.get('state_dict', state.get('model', state))  # OpenOOD saves the bare state_dict
        state = {k.removeprefix('module.'): v for k, v in state.items()}
        if config:
            args = dict(config.get('model_args', {}), num_classes=config.get('num_classes', len(state['head.bias'])))
            model = timm.create_model(config['architecture'].split('/')[-1].split('.')[0], **args)
        else:
            dim, patch = state['patch_embed.proj.weight'].shape[0], state['patch_embed.proj.weight'].shape[-1]
            grid = round(math.sqrt(state['pos_embed'].shape[1] - ('cls_token' in state)))
            model = timm.models.vision_transformer.VisionTransformer(  # heads of 64 dims, as every standard ViT
                img_size=grid * patch, patch_size=patch, embed_dim=dim, num_heads=dim // 64,
                num_classes=len(state['head.bias']), mlp_ratio=len(state['blocks.0.mlp.fc1.bias']) / dim,
                depth=1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.')),
                qkv_bias='blocks.0.attn.qkv.bias' in state)
        model.load_state_dict(state)
    except Exception as e:  # weights missing or unreadable, not a ViT, keys or shapes that do not fit
        fail(f"teacher {spec} is not a timm ViT that loads strictly ({type(e).__name__}: "
             f"{' '.join(str(e).split())[:240]}): pass its config.json beside the weights, or another --teacher")
    return model

def load_teacher(spec, device, classes, class_order='auto', stats=None):
    """A teacher checked against classes -> (forward, info), at its input size, normalised with stats or its own."""
    path = Path(spec)
    ckpt_file = run_file(path, 'teacher') if (path / 'best.pt').exists() else path if path.suffix == '.pt' else None
    if not ckpt_file and (path / 'last.pt').exists():
        fail(f'teacher {path} has last.pt but no best.pt: pass {path / "last.pt"} to distil from its last epoch')
    if not path.exists() and (ckpt_file or spec.count('/') != 1 or spec.startswith(('.', '/', '~'))):
        fail(f'cannot load teacher {spec!r}: there is no such path; pass a run directory, a .pt, a timm or '
             f'transformers model (hub id or folder), or --teacher baseline')
    if path.is_file() and path.suffix not in ('.pt', '.bin', '.pth', '.ckpt', '.safetensors'):
        fail(f'teacher {spec} is a file but no .pt of ours nor a state_dict (.bin .pth .ckpt .safetensors): pass its '
             f'run folder or another --teacher')
    if not path.exists():
        offline_if_unreachable()
    config_file = None if ckpt_file or path.is_file() else hub_file(spec, 'config.json')
    config = read_json(config_file, 'pass another --teacher') if config_file else {}
    if ckpt_file is not None:
        ckpt = read_checkpoint(ckpt_file, 'teacher')
        model = Net(ckpt['arch'], ckpt['num_classes'])
        model.load_state_dict(ckpt['model'])
        own, size, names, dim = (ckpt['mean'], ckpt['std']), ckpt['image_size'], ckpt.get('classes'), model.feature_dim
        run, kind = lambda x: model(x, features=True), 'checkpoint'
    elif path.is_file() or 'architecture' in config:
        model, kind = timm_vit(spec, config), 'timm'
        pretrained = config.get('pretrained_cfg', config)
        own = (pretrained['mean'], pretrained['std']) if 'mean' in pretrained else None  # a bare state_dict has none
        size, dim = model.patch_embed.img_size[0], model.num_features
        names = config.get('label_names') or pretrained.get('label_names')

        def run(x):  # OAL's teacher feature: timm's pre-logits (ViT: the [CLS] token after the last norm)
            h = model.forward_head(model.forward_features(x), pre_logits=True)
            return model.get_classifier()(h), h
    else:
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        try:
            model, kind = AutoModelForImageClassification.from_pretrained(spec), 'transformers'
        except Exception as e:
            where = (f'the folder {spec} is not a timm or transformers image classifier ({type(e).__name__})'
                     if path.is_dir() else
                     f'it is no local path and did not load as a hub id ({type(e).__name__}; offline?); fetch it where '
                     f'there is a network (huggingface-cli download {spec} --local-dir DIR) and pass --teacher DIR')
            fail(f'cannot load teacher {spec!r}: {where}; or pass a run directory, a .pt, or --teacher baseline')
        try:  # the teacher's own preprocessing, from its preprocessor_config.json
            processor = AutoImageProcessor.from_pretrained(spec)
            own = tuple(processor.image_mean), tuple(processor.image_std)
            size = processor.size.get('height') or processor.size.get('shortest_edge') or model.config.image_size
        except Exception:  # no preprocessor config: ViT's defaults
            own, size = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), model.config.image_size
        size = size if isinstance(size, int) else size[0]
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        head = model.classifier if hasattr(model, 'classifier') else model.get_output_embeddings()
        captured, dim = {}, head.in_features
        head.register_forward_hook(lambda module, inputs, output: captured.__setitem__('h', inputs[0]))
        run = lambda x: (model(pixel_values=x).logits, captured['h'])  # the head's input: ViT's normalised [CLS]
    model.to(device).eval().requires_grad_(False)
    num_classes = model.num_classes if kind == 'timm' else len(names or classes)
    if num_classes != len(classes):
        fail(f'teacher {spec} has {num_classes} classes but the dataset has {len(classes)}: pass one of this dataset')
    if (stats or own) is None:
        fail(f'teacher {spec} is a bare state_dict without input statistics of its own: pass --teacher-norm published')
    order = teacher_class_order(names, classes, class_order, spec, device)

    def feeder(mean, std):
        def forward(x):
            logits, h = run(normalize(x, mean, std, size))
            return (logits if order is None else logits[:, order]), h
        return forward
    mean, std = stats or own
    return feeder(mean, std), dict(kind=kind, name=str(ckpt_file or spec), feature_dim=dim, image_size=size,
                                   mean=list(mean), std=list(std), own=own and [list(own[0]), list(own[1])],
                                   num_classes=len(classes), module=model, feeder=feeder,
                                   class_order='as the dataset' if order is None else order.tolist())

def teacher_stamp(name, spec):  # its file's (or folder's files') names, sizes and times; None for a hub id
    files = [Path(name)] if Path(name).is_file() else sorted(
        f for f in Path(spec).iterdir() if f.is_file()) if Path(spec).is_dir() else []
    return ','.join(f'{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}' for f in files) or None

def teacher_class_order(names, classes, mode, spec, device):
    """Indices putting the teacher's logits in the classes' order, matched by name (case, '_' and '-' ignored)."""
    canon = lambda name: ' '.join(re.split(r'[\s_\-]+', str(name).strip().lower()))
    if mode == 'ignore' or names is None or all(re.fullmatch(r'(label )?\d+', canon(n)) for n in names):
        return None  # outputs taken in order (LABEL_3 is no name): teacher_accuracy catches a wrong one
    theirs, ours = [canon(n) for n in names], [canon(c) for c in classes]
    missing = [c for c, name in zip(classes, ours) if name not in theirs]
    if missing or len(set(theirs)) != len(theirs):
        problem = f'no class named {missing[0]!r}' if missing else 'a label twice'
        fail(f"teacher {spec} has {problem} (its labels: {', '.join(map(str, names[:4]))}, ...): pass a teacher "
             f"trained on this dataset, or --teacher-class-order ignore if its outputs are in the dataset's order")
    order = [theirs.index(name) for name in ours]
    return None if order == list(range(len(ours))) else torch.tensor(order, device=device)

@torch.no_grad()
def teacher_accuracy(forward, info, images, labels, device, min_acc, dataset, batch_size=256):
    """Top-1 on (uint8 NHWC images, labels), stopping below min_acc: a wrong teacher shows before a step is spent."""
    def top1(run):
        with torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else nullcontext():
            predicted = [run(torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).to(device))[0].argmax(1)
                         for i in range(0, len(labels), batch_size)]
        return (torch.cat(predicted).cpu() == torch.as_tensor(labels)).sum().item() / len(labels)
    accuracy, own = top1(forward), info['own']
    inputs = f"{info['image_size']}px, mean {[round(m, 4) for m in info['mean']]}"
    if own and own != [info['mean'], info['std']]:
        inputs += f"; {100 * top1(info['feeder'](*own)):.2f}% with its own statistics (--teacher-norm own)"
    print(f"teacher {info['name']}: val top-1 {100 * accuracy:.2f}% on {dataset} (inputs {inputs})")
    if accuracy < min_acc:
        fail(f"teacher {info['name']} gets {100 * accuracy:.1f}% top-1 on the {dataset} validation split, below "
             f"--teacher-min-acc {min_acc:g}: it does not fit this data (another dataset, label order or input "
             f"statistics: --teacher-norm); pass the right --teacher")
    return accuracy


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
    p.add_argument('--dataset', default='digits', help='digits | cifar10 | cifar100')
    p.add_argument('--data-root', default='./data', help='where torchvision datasets live or are downloaded to')
    p.add_argument('--openood-root', help="OpenOOD's data folder: its val/test lists")
    p.add_argument('--teacher', help='a run or .pt of ours, a timm or transformers model (hub id, folder, state_dict '
                                     'file), or baseline (= runs/<dataset>_ce_s0); default TEACHERS, else baseline')
    p.add_argument('--teacher-class-order', default='auto', choices=['auto', 'ignore'],
                   help="auto: match the teacher's label names to the classes; ignore: take its outputs in order")
    p.add_argument('--teacher-norm', default='published', choices=['published', 'own'],
                   help="published: the teacher sees the dataset's mean/std, as OAL fed it; own: its own config's")
    p.add_argument('--teacher-min-acc', type=SHARE, default=0.5, help="stop when the teacher's val top-1 is below this")
    p.add_argument('--crop', default='published', choices=['published', 'native'],
                   help='published: resize to the training size, flip and pad-crop there; native: crop, then resize')
    p.add_argument('--init', help="the student's start (default runs/<dataset>_ce_s0; 'none': scratch); {seed} allowed")
    p.add_argument('--outliers', help='folder from generate.py oal (default outliers/<dataset>)')
    p.add_argument('--arch', choices=ARCH_SIZE, help="student arch (default: the --init checkpoint's)")
    p.add_argument('--image-size', type=POSITIVE, help="student resolution (default: --init's; the paper: 224)")
    for flag, value in (('--w-kd', 4.0), ('--w-feat', 8.0), ('--w-knn', 0.1), ('--w-diff', 0.2)):
        p.add_argument(flag, type=WEIGHT, default=value, help='weight of its term in the OAL loss')
    p.add_argument('--club', default='joint', choices=['joint', 'alternating'],
                   help='joint (faithful): q-networks minimise the same loss; alternating: fit q, then minimise CLUB')
    p.add_argument('--epochs', type=POSITIVE, help='default 100 (30 for digits)')
    p.add_argument('--batch-size', type=POSITIVE, help='default 128 (64 for digits)')
    p.add_argument('--lr', type=RATE, default=0.005, help='student lr (DT: --lr-dt, q-networks: --lr-q)')
    p.add_argument('--lr-dt', type=RATE, default=0.01)
    p.add_argument('--lr-q', type=RATE, default=1e-4)
    p.add_argument('--weight-decay', type=WEIGHT, default=5e-4)
    p.add_argument('--seed', type=seeds, default='0', help='an integer or several (0,1,2): a run each, {seed} in --out')
    p.add_argument('--out', help='run folder (default runs/<dataset>_oal_s{seed})')
    p.add_argument('--resume', action='store_true', help='continue the run in --out (from scratch without last.pt)')
    p.add_argument('--overwrite', action='store_true', help='start afresh over the run in --out')
    p.add_argument('--stop-after', type=POSITIVE, help='leave after this many epochs (--resume continues)')
    p.add_argument('--device', type=device, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--compile', action='store_true', help='torch.compile the student and the teacher')
    args = p.parse_args(argv)
    if args.dataset.startswith('folder:'):
        fail('train_oal.py keeps the training set in memory; it takes digits, cifar10 or cifar100, not folder datasets')
    for key, value in RECIPES['digits' if args.dataset == 'digits' else 'cifar'].items():
        setattr(args, key, value if getattr(args, key, None) is None else getattr(args, key))
    if args.batch_size < (least := 2 * world_size()):
        fail(f"--batch-size must be an integer >= {least} (DT's BatchNorm needs 2 per process), got {args.batch_size}")
    if args.resume and args.overwrite:
        fail('--resume continues the run in --out and --overwrite starts it afresh: pass one of them')
    args.teacher = args.teacher or TEACHERS.get(args.dataset, 'baseline')
    args.teacher = f'runs/{args.dataset}_ce_s0' if args.teacher == 'baseline' else args.teacher
    args.init, args.outliers = args.init or f'runs/{args.dataset}_ce_s0', args.outliers or f'outliers/{args.dataset}'
    args.out = f'runs/{args.dataset}_oal_s{{seed}}' if args.out is None else args.out
    template('--init', args.init, ['seed'])
    if 'seed' not in template('--out', args.out, ['seed']) and len(args.seed) > 1:
        fail(f'--seed {",".join(map(str, args.seed))} makes one run per seed: put {{seed}} in --out '
             f'(e.g. {args.out}_s{{seed}})')
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
        data = prepare(args, device, rank, world)
        outs = {seed: Path(args.out.format(seed=seed)) for seed in args.seed}
        run = {('--' + k.replace('_', '-') if k in vars(args) else k): v for k, v in data['run'].items()}
        inputs = [('--teacher run', args.teacher), ('--outliers set', args.outliers),
                  ('--openood-root', args.openood_root)]
        hint = 'pass --resume to continue it, --overwrite to start afresh, or another --out'

        def claim_runs():  # every seed's folder checked, then each taken, before the first step: none refused half-way
            inits = {seed: args.init.format(seed=seed) for seed in outs}
            for dry in (True, False):
                taken = {seed: claim(out, '--out', 'train_oal.py', dict(run, **{'--seed': seed, '--init': inits[seed]}),
                                     args.overwrite, args.resume, 'a run', hint,
                                     inputs + [('--init run', inits[seed] if inits[seed] != 'none' else None)], dry)
                         for seed, out in outs.items()}
            return {seed: 'last.pt' in set(manifest['files']) - set(manifest['stale'])
                    and (outs[seed] / 'last.pt').exists() for seed, manifest in taken.items()}
        resumable = on_rank0(rank, world, claim_runs)

        def read_later():  # a damaged last.pt of a later seed: found now, not after the seeds before it have trained
            for seed in [s for s in outs if resumable[s] and args.resume][1:]:
                start(args, data, seed, outs[seed], True, torch.device('cpu'), 0)
        on_rank0(rank, world, read_later)
        if args.compile:  # the teacher's network too: it runs once per step, as many images as the student
            data['info']['module'].forward = torch.compile(data['info']['module'].forward)
        for seed, out in outs.items():
            if len(outs) > 1 and rank == 0:
                print(f'== seed {seed} -> {out}')
            train(args, data, seed, out, resumable[seed] and args.resume, device, rank, world)
        if world > 1:
            dist.destroy_process_group()

if __name__ == '__main__':
    main()
