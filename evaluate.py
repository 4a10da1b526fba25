"""Score checkpoints on the OpenOOD v1.5 benchmark with 14 post-hoc OOD detectors.

Protocol: OpenOOD v1.5 (Zhang et al. 2023). ID test vs near-OOD and far-OOD sets, OOD = positive
class, FPR@95 / AUROC / AUPR-In / AUPR-Out / ACC in %, `near` and `far` = unweighted means.
The network runs once per dataset, in float32 as OpenOOD does (--bf16 for speed); every detector
except ODIN (which needs input gradients) is scored from the cached logits and penultimate features,
with statistics fitted only for the detectors asked for, in memory that does not grow past the outputs
themselves at ImageNet-1K scale. Several runs = seeds: mean +- std.

    python evaluate.py runs/digits_ce_s0 runs/digits_ce_s1 runs/digits_ce_s2 --out results/digits_ce
    python evaluate.py runs/c10_sio_s*/ --dataset cifar10 --near tin=data/tin --no-tin --cache cache/
    python evaluate.py runs/c10_oal_s0 --openood-root data/openood --detectors ebo,msp,knn --plots plots/
    python evaluate.py baseline=runs/ce_s0,runs/ce_s1 sio=runs/sio_s0,runs/sio_s1 --detectors msp,ebo,knn   # one comparison table
    torchrun --nproc_per_node=4 evaluate.py runs/c100_sio_s0    # rank-sharded network passes
    python evaluate.py --bench-features 200000,2048,1000        # time + memory of each detector on synthetic features
    python evaluate.py runs/c10_sio_s0 --aps sio --aps-ood data/c100_heldout   # EBO/ODIN/KNN settings searched as the SIO code did

Detectors: msp mls ebo tempscale odin gen klm react ash dice mds rmds knn vim (SPEC section 4).
"""
import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from sklearn import metrics as skm
from tqdm import tqdm

RESULT_FILES = ('results.json', 'results.csv', 'results.md', 'scores.npz')  # what evaluate.py writes in --out
DETECTORS = ['msp', 'mls', 'ebo', 'tempscale', 'odin', 'gen', 'klm', 'react', 'ash', 'dice', 'mds', 'rmds', 'knn', 'vim']
METRICS = ['FPR95', 'AUROC', 'AUPR_IN', 'AUPR_OUT', 'ACC', 'FPR95_ID']
METRIC_TITLES = {'FPR95': 'FPR@95', 'AUROC': 'AUROC', 'AUPR_IN': 'AUPR-In', 'AUPR_OUT': 'AUPR-Out', 'ACC': 'ACC', 'FPR95_ID': 'FPR95(ID+)'}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='*', help='run directories (their best.pt) or .pt checkpoints; several = seeds of one setting; '
                   'or NAME=RUN,RUN,... per setting to compare settings in one table')
    p.add_argument('--dataset', default=None, help="override the checkpoint's dataset: digits | cifar10 | cifar100 | folder:PATH")
    p.add_argument('--data-root', default='./data')
    p.add_argument('--openood-root', default=None, help="OpenOOD's data dir (benchmark_imglist/, images_classic/): its exact lists")
    p.add_argument('--near', action='append', default=[], metavar='NAME=PATH', help='add/replace a near-OOD image folder (e.g. tin=data/tin)')
    p.add_argument('--far', action='append', default=[], metavar='NAME=PATH', help='add/replace a far-OOD image folder')
    p.add_argument('--no-tin', action='store_true', help='near-OOD without TinyImageNet, as the SIO paper reports')
    p.add_argument('--strict', action='store_true', help='a missing OOD set is an error, not a warning')
    p.add_argument('--detectors', default='all', help='all, or a comma list of ' + ','.join(DETECTORS))
    p.add_argument('--cache', default=None, help='keep logits/features in DIR/<run>/<split>.npz and reuse them')
    p.add_argument('--out', default=None, help='write results.json/.csv/.md and scores.npz here')
    p.add_argument('--overwrite', action='store_true', help="replace an earlier evaluation's results in --out")
    p.add_argument('--plots', default=None, help='write score histograms and ROC curves (PNG) here')
    p.add_argument('--batch-size', type=int, default=512)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--bf16', action='store_true', help='run the network under bf16 autocast: faster, but scores move '
                   '(see README); the default is float32 with TF32 off, as OpenOOD scores')
    p.add_argument('--bench-features', default=None, metavar='N,D,C[,M]', help='no checkpoints: time fit + score of each '
                   'detector on synthetic features (N train rows, D dims, C classes, M test rows) and print peak memory')
    p.add_argument('--aps', default=None, choices=['sio', 'val'],
                   help="OpenOOD's automatic parameter search for ebo/odin/knn over APS_GRIDS, by AUROC against --aps-ood: "
                        'sio = as the SIO code ran it (ID test scores kept at the default setting, for the search and the table); '
                        'val = validation ID vs validation OOD, then every set scored with the pick (OpenOOD v1.5)')
    p.add_argument('--aps-ood', default=None, metavar='PATH', help="validation OOD images for --aps, an image folder (the SIO code: "
                   "held-out CIFAR-100 images for CIFAR-10; OpenOOD v1.5: TinyImageNet's val_tin list, used by default with --openood-root)")
    # detector settings (OpenOOD v1.5 defaults)
    p.add_argument('--ebo-temperature', type=float, default=1.0, help='energy score T * logsumexp(z / T)')
    p.add_argument('--odin-temperature', type=float, default=1000.0)
    p.add_argument('--odin-eps', type=float, default=0.0014, help='ODIN step in [0,1] pixel units')
    p.add_argument('--gen-gamma', type=float, default=0.1)
    p.add_argument('--react-percentile', type=float, default=90.0)
    p.add_argument('--ash-percentile', type=float, default=90.0, help='ASH-B keeps the top 100-p percent')
    p.add_argument('--dice-percentile', type=float, default=90.0, help='DICE keeps the top 100-p percent of weights')
    p.add_argument('--knn-k', type=int, default=50)
    p.add_argument('--vim-dim', type=int, default=None, help="ViM principal dimensions (default OpenOOD's 256; d/2 for features of 256 dims or fewer)")
    args = p.parse_args(argv)
    if not args.runs and not args.bench_features:
        fail('no runs given: pass run directories (or .pt checkpoints) to score, or --bench-features N,D,C to time the detectors')
    args.detectors = DETECTORS if args.detectors == 'all' else [d.strip() for d in args.detectors.split(',') if d.strip()]
    unknown = [d for d in args.detectors if d not in DETECTORS]
    if unknown:
        fail(f"unknown detector(s) {', '.join(unknown)}: choose from {', '.join(DETECTORS)} or 'all'")
    if args.aps_ood and not args.aps:
        fail('--aps-ood names the validation OOD images of --aps: pass --aps sio or --aps val too, or drop --aps-ood')
    for flag in args.near + args.far:
        if '=' not in flag:
            fail(f'--near/--far take NAME=PATH (e.g. --near tin=data/tin), got {flag!r}')
    percentile = ('in (0, 100)', lambda v: 0 < v < 100)
    check_ranges(args, [
        ('--batch-size', 'an integer >= 1', lambda v: v >= 1),
        ('--odin-temperature', 'a number > 0', lambda v: 0 < v < math.inf),
        ('--ebo-temperature', 'a number > 0', lambda v: 0 < v < math.inf),
        ('--odin-eps', 'a number >= 0', lambda v: 0 <= v < math.inf),
        ('--gen-gamma', 'a number > 0', lambda v: 0 < v < math.inf),
        ('--react-percentile', *percentile), ('--ash-percentile', *percentile), ('--dice-percentile', *percentile),
        ('--knn-k', 'an integer >= 1', lambda v: v >= 1),
        ('--vim-dim', 'an integer >= 1', lambda v: v >= 1),
    ])
    check_device(args.device)
    return args


def fail(message):
    """One line for the user, exit code 2, no traceback (tqdm.write: on a line of its own even under a progress bar)."""
    tqdm.write(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def check_ranges(args, rules):
    """(flag, valid range in words, test) for every numeric flag: one line before anything is loaded."""
    for flag, valid, ok in rules:
        value = getattr(args, flag[2:].replace('-', '_'))
        if value is not None and not ok(value):  # NaN fails every comparison, so it is refused too
            fail(f'{flag} must be {valid}, got {value}')


def check_device(name):
    """--device must name a device this machine has, said now rather than deep inside a run."""
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f'--device {name!r} is not a device name: pass cpu, cuda or cuda:N')
    if device.type == 'cuda' and not torch.cuda.is_available():
        fail(f'--device {name}: this machine has no CUDA device; pass --device cpu')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        fail(f'--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); pass cuda:0 .. cuda:{torch.cuda.device_count() - 1}')


def check_out(out):
    """--out must be a folder this process can write: one line now, not a traceback at the first save."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        fail(f'--out {out} is a file, not a folder: pass a folder')
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f'.write-test-{os.getpid()}'
        probe.touch()
        probe.unlink()
    except OSError as e:
        fail(f'--out {out} cannot be written ({e.strerror or type(e).__name__}): pass a folder you can write to')


HELD_LOCKS = {}  # folder -> open lock file: this process's own locks (main() may run twice in one process)


def lock_folder(lock_file):
    """One process per output folder: an exclusive flock held until this process ends (the OS drops it on any exit or kill)."""
    try:
        import fcntl
    except ImportError:  # Windows has no flock: one writer per folder is then up to you
        return None
    lock_file = Path(lock_file).resolve()
    held = HELD_LOCKS.get(lock_file)
    if held is not None and lock_file.exists() and os.stat(lock_file).st_ino == os.fstat(held.fileno()).st_ino:
        return held  # this process holds it already (and the folder was not made anew meanwhile)
    handle = open(lock_file, 'a+')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        fail(f'{lock_file.parent} is in use by another process (pid {handle.read().strip() or "?"}): wait for it to end, or pass another --out')
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    HELD_LOCKS[lock_file] = handle
    return handle


def claim_out(out, mine, held, proceed):
    """The one rule for every --out, the same in each script: a missing or empty folder is used; a folder holding
    only files this script writes is used when nothing finished is there or this run continues it (held None);
    a finished result (held says what) is refused with the flags that proceed; a folder holding anything else is
    refused. --overwrite replaces only files this script writes: nothing else is ever deleted."""
    out = Path(out)
    lock_file = lambda e: e.name.startswith('.') and e.name.endswith('.lock')  # ours, or generate.py fit's beside its --out
    others = sorted(e.name for e in out.iterdir() if not lock_file(e) and not mine(e)) if out.is_dir() else []
    if others:
        fail(f'--out {out} holds files this script did not write ({", ".join(others[:3])}{", ..." if len(others) > 3 else ""}): '
             f'pass a new or empty folder')
    if held:
        fail(f'--out {out} holds {held}: {proceed}')


def temporary(path):
    """A temporary name beside path, unique to this process."""
    return Path(f'{path}.{os.getpid()}.tmp')


def is_temporary(entry, names):
    """A temporary file of one of names (name.PID.tmp), left by a killed process if no one holds the lock."""
    parts = entry.name.rsplit('.', 2)
    return len(parts) == 3 and parts[0] in names and parts[1].isdigit() and parts[2] == 'tmp'


# ----------------------------------------------------------------------------------------------
# Data. Same loader in every script: a dict with uint8 (N, H, W, 3) arrays (or file lists for
# image folders), int labels, class names, native image size and normalisation.

CIFAR_STATS = {'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIGIT_NAMES = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')


def digits_images():
    """sklearn's 1,797 8x8 digits as uint8 (N, 8, 8, 3): value * 255 / 16, grey replicated. Read from the CSV that
    scikit-learn ships, as load_digits reads it, without importing sklearn.datasets (1.4 s at every start)."""
    import importlib.util
    spec = importlib.util.find_spec('sklearn')
    csv = Path(spec.origin).parent / 'datasets' / 'data' / 'digits.csv.gz' if spec and spec.origin else None
    if csv is not None and csv.exists():
        data = np.loadtxt(csv, delimiter=',')
        pixels, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    else:  # a scikit-learn that keeps it elsewhere
        from sklearn.datasets import load_digits
        digits = load_digits()
        pixels, target = digits.images, digits.target
    images = np.rint(pixels * 255 / 16).astype(np.uint8)
    return np.repeat(images[..., None], 3, axis=-1), target.astype(np.int64)


def load_digits_splits():
    """ID = digits 0-5; per class RandomState(0).permutation of its indices: 60% train, 10% val, 30% test."""
    images, labels = digits_images()
    split = {'train': [], 'val': [], 'test': []}
    for c in range(6):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.random.RandomState(0).permutation(len(idx))]
        n_train, n_val = int(0.6 * len(idx)), int(0.1 * len(idx))
        split['train'].append(idx[:n_train])
        split['val'].append(idx[n_train:n_train + n_val])
        split['test'].append(idx[n_train + n_val:])
    out = {name: (images[np.concatenate(ix)], labels[np.concatenate(ix)]) for name, ix in split.items()}
    train = out['train'][0].astype(np.float64) / 255
    mean, std = tuple(float(m) for m in train.mean(axis=(0, 1, 2))), tuple(float(s) for s in train.std(axis=(0, 1, 2)))
    return dict(out, classes=DIGIT_NAMES[:6], image_size=8, mean=mean, std=std)


def torchvision_set(cls, root, **kwargs):
    """A torchvision dataset, downloaded if absent; None when it is absent and cannot be downloaded."""
    try:
        return cls(root, download=False, **kwargs)
    except Exception:
        pass
    try:
        return cls(root, download=True, **kwargs)
    except Exception:
        return None


def read_imglist(openood_root, list_path):
    """OpenOOD image list: 'relative/path.png label' per line, relative to images_classic/."""
    root = Path(openood_root)
    lines = (root / 'benchmark_imglist' / list_path).read_text().split('\n')
    paths, labels = [], []
    for line in filter(None, (l.strip() for l in lines)):
        rel, label = line.rsplit(' ', 1)
        paths.append(str(root / 'images_classic' / rel))
        labels.append(int(label))
    return paths, np.array(labels, dtype=np.int64)


def read_images(paths, size):
    """Decode image files to uint8 (N, size, size, 3) (resize only when the size differs)."""
    from PIL import Image
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            image = Image.open(path).convert('RGB')
        except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            fail(f'cannot read image {path} ({type(e).__name__}): replace or remove that file')
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        out[i] = np.asarray(image)
    return out


def image_folder(path):
    """ImageFolder layout: class = sorted sub-folder names, files sorted within each."""
    path = Path(path)
    if not path.is_dir():
        fail(f'{path} does not exist: a folder dataset needs PATH/train/<class>/* and PATH/val/<class>/*')
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((path / name).rglob('*')):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(str(f))
                labels.append(c)
    return files, np.array(labels, dtype=np.int64), classes


# ImageNet subsets of the SIO code (imagenet_train_subclasses.py, SUB_CLASSES): positions in the 1,000 sorted
# ImageNet-1K class folders. imagenet-10 = n01644373 n01744401 n01833805 n02099601 n02123045 n02690373 n03417042
# n04037443 n04273569 n07745940 (the wnids of its train_imagenet_10.txt); imagenet-dogs = the 100 dogs 151..250.
IMAGENET_SUBSETS = {'imagenet-10': [404, 751, 94, 281, 62, 207, 31, 949, 814, 569], 'imagenet-dogs': list(range(151, 251))}


def subset_classes(spec, classes):
    """--classes: imagenet-10 / imagenet-dogs, or a file of class folder names (one per line, first word, so
    LOC_synset_mapping.txt lines work). Returns the chosen names, sorted (labels follow that order, as in the SIO code)."""
    if spec in IMAGENET_SUBSETS:
        if len(classes) != 1000:
            fail(f'--classes {spec} takes ImageNet-1K classes by position, but the folder has {len(classes)} classes: '
                 f'point --dataset folder:PATH at an ImageNet-1K layout (1,000 class folders), or pass a file of class names')
        return sorted(classes[i] for i in IMAGENET_SUBSETS[spec])
    try:
        names = sorted({line.split()[0] for line in Path(spec).read_text().splitlines() if line.strip()})
    except (OSError, UnicodeDecodeError) as e:
        fail(f'--classes {spec} cannot be read ({type(e).__name__}): pass imagenet-10, imagenet-dogs or a text file of class folder names')
    if len(names) < 2:
        fail(f'--classes {spec}: {len(names)} class named, a classifier needs 2 or more: fix the list')
    return names  # load_dataset checks that each has a folder


def load_dataset(name, data_root='./data', openood_root=None, classes=None):
    """classes (folder datasets): --classes' spec or a list of class folder names; the other classes' test images
    then come back as other_classes (the SIO code's OOD set for ImageNet subsets)."""
    if name == 'digits':
        return load_digits_splits()
    if name in ('cifar10', 'cifar100'):
        import torchvision  # imported where it is used: it adds 1.6 s to every start, and digits needs none of it
        cls = torchvision.datasets.CIFAR10 if name == 'cifar10' else torchvision.datasets.CIFAR100
        train, test = torchvision_set(cls, data_root, train=True), torchvision_set(cls, data_root, train=False)
        if train is None or test is None:
            fail(f'{cls.__name__} is not under {os.path.abspath(data_root)} and could not be downloaded (offline?); '
                 f'put it there or point --data-root at the folder that holds it')
        test_x, test_y = test.data, np.array(test.targets, dtype=np.int64)
        if openood_root:  # OpenOOD v1.5's own split of the official test set, exactly
            val_paths, val_y = read_imglist(openood_root, f'{name}/val_{name}.txt')
            test_paths, test_y = read_imglist(openood_root, f'{name}/test_{name}.txt')
            val, test = (read_images(val_paths, 32), val_y), (read_images(test_paths, 32), test_y)
        else:  # OpenOOD v1.5: 1,000 test images are validation, the other 9,000 the ID test set
            perm = np.random.RandomState(0).permutation(len(test_x))
            val, test = (test_x[perm[:1000]], test_y[perm[:1000]]), (test_x[perm[1000:]], test_y[perm[1000:]])
        mean, std = CIFAR_STATS[name]
        return dict(train=(train.data, np.array(train.targets, dtype=np.int64)), val=val, test=test,
                    classes=list(train.classes), image_size=32, mean=mean, std=std)
    if name.startswith('folder:'):
        root = Path(name[len('folder:'):])
        train_files, train_y, all_classes = image_folder(root / 'train')
        val_files, val_y, val_classes = image_folder(root / 'val')
        if val_classes != all_classes:
            fail(f'{root}/val has classes {val_classes[:5]}... but {root}/train has {all_classes[:5]}...: they must match')
        test = image_folder(root / 'test')[:2] if (root / 'test').is_dir() else (val_files, val_y)
        classes = subset_classes(classes, all_classes) if isinstance(classes, str) else list(classes or all_classes)
        missing = [c for c in classes if c not in all_classes]
        if missing:
            fail(f'{root} has no class folder {missing[0]} ({len(missing)} of the {len(classes)} classes asked for): '
                 f'fix the class list, or pass the dataset it comes from')

        def select(split, names):  # the images of these classes, labelled by their position in names
            position = {all_classes.index(n): i for i, n in enumerate(names)}
            keep = [j for j, y in enumerate(split[1]) if y in position]
            return [split[0][j] for j in keep], np.array([position[split[1][j]] for j in keep], dtype=np.int64)
        other = [c for c in all_classes if c not in classes]
        mean, std = IMAGENET_STATS
        return dict(train=select((train_files, train_y), classes), val=select((val_files, val_y), classes), test=select(test, classes),
                    classes=classes, other_classes=select(test, other)[0] if other else [], image_size=224, mean=mean, std=std)
    fail(f'unknown --dataset {name!r}: use digits, cifar10, cifar100 or folder:PATH')


# ----------------------------------------------------------------------------------------------
# Model. Same builder in every script: torchvision ResNets with a two-line CIFAR stem change, a
# small CNN for 8x8 digits; forward(x, features=True) also returns the penultimate feature h.

class Net(nn.Module):
    def __init__(self, arch, num_classes):
        super().__init__()
        if arch == 'cnn':
            def block(c_in, c_out):
                return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            self.body = nn.Sequential(*block(3, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            dim = 128
        elif arch in ('resnet18', 'resnet18_224', 'resnet50'):
            import torchvision
            self.body = getattr(torchvision.models, arch.replace('_224', ''))()
            if arch == 'resnet18':  # CIFAR stem: 3x3 stride-1 conv, no max-pool (32x32 input)
                self.body.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
                self.body.maxpool = nn.Identity()
            dim = self.body.fc.in_features
            self.body.fc = nn.Identity()
        else:
            fail(f'unknown --arch {arch!r}: use resnet18, resnet18_224, resnet50 or cnn')
        self.fc = nn.Linear(dim, num_classes)
        self.feature_dim = dim

    def forward(self, x, features=False):
        h = self.body(x)
        z = self.fc(h)
        return (z, h) if features else z


ARCH_SIZE = {'cnn': 8, 'resnet18': 32, 'resnet18_224': 224, 'resnet50': 224}

# ----------------------------------------------------------------------------------------------
# Benchmarks: ID test + near/far OOD sets as uint8 (N, S, S, 3) at the ID set's native size S
# (OpenOOD's test transform: RGB, resize shorter side, centre crop; normalisation comes later).

def image_files(path):
    """Every image file under a folder, searched recursively, in sorted order ([] when it is no folder)."""
    return [str(f) for f in sorted(Path(path).rglob('*')) if f.suffix.lower() in IMAGE_EXTENSIONS] if Path(path).is_dir() else []


def resize_crop(images, size):
    """uint8 (N, H, W, 3) or (N, H, W) -> uint8 (N, size, size, 3): shorter side to size, centre crop."""
    x = torch.from_numpy(np.asarray(images))
    x = x[..., None].expand(*x.shape, 3) if x.ndim == 3 else x
    x = x.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = torch.cat([F.interpolate(x[i:i + 512], size=(nh, nw), mode='bilinear', antialias=True, align_corners=False)
                       for i in range(0, len(x), 512)])
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).contiguous().numpy()


def read_files(files, size):
    """Image files -> uint8 (N, size, size, 3) through the same resize + centre crop as every other set."""
    from PIL import Image
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        out[i] = resize_crop(np.array(Image.open(f).convert('RGB'))[None], size)[0]
    return out


def sample_image_patches(index):
    """Far-OOD for digits: a scikit-learn sample photo, grey, 16x16 grid crops, area-downscaled to 8x8, stretched."""
    from sklearn.datasets import load_sample_images
    image = load_sample_images().images[index].astype(np.float64)
    grey = image @ np.array([0.299, 0.587, 0.114])
    rows, cols = grey.shape[0] // 16, grey.shape[1] // 16
    patches = grey[:rows * 16, :cols * 16].reshape(rows, 16, cols, 16).transpose(0, 2, 1, 3).reshape(-1, 16, 16)
    small = patches.reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
    low, high = small.min(axis=(1, 2), keepdims=True), small.max(axis=(1, 2), keepdims=True)
    stretched = np.rint((small - low) / np.maximum(high - low, 1e-8) * 255).astype(np.uint8)
    return np.repeat(stretched[..., None], 3, axis=-1)


def digits_ood(name):
    if name == 'digits6-9':
        images, labels = digits_images()
        return images[labels >= 6]
    return sample_image_patches(['china', 'flower'].index(name))


def torchvision_ood(name, root, size):
    """CIFAR-10/100, MNIST, SVHN, Textures (DTD, all 5,640 images) and Places365 (val) from torchvision."""
    import torchvision
    tv = torchvision.datasets
    if name in ('cifar10', 'cifar100'):
        ds = torchvision_set(tv.CIFAR10 if name == 'cifar10' else tv.CIFAR100, root, train=False)
        return None if ds is None else resize_crop(ds.data, size)
    if name == 'mnist':
        ds = torchvision_set(tv.MNIST, root, train=False)
        return None if ds is None else resize_crop(ds.data.numpy(), size)
    if name == 'svhn':
        ds = torchvision_set(tv.SVHN, root, split='test')
        return None if ds is None else resize_crop(ds.data.transpose(0, 2, 3, 1), size)
    if name == 'texture':
        parts = [torchvision_set(tv.DTD, root, split=s) for s in ('train', 'val', 'test')]
        return None if None in parts else read_files([f for part in parts for f in part._image_files], size)
    if name == 'places365':
        ds = torchvision_set(tv.Places365, root, split='val', small=True)
        return None if ds is None else read_files([f for f, _ in ds.imgs], size)
    return None


BENCHMARKS = {  # OpenOOD v1.5 (SPEC section 4); OpenOOD image-list names
    'digits': dict(near=['digits6-9'], far=['china', 'flower']),
    'cifar10': dict(near=['cifar100', 'tin'], far=['mnist', 'svhn', 'texture', 'places365']),
    'cifar100': dict(near=['cifar10', 'tin'], far=['mnist', 'svhn', 'texture', 'places365']),
}


def ood_sets(dataset, size, args, other_classes=None):
    """{name: (group, uint8 images)} for the benchmark; missing sets are skipped with a warning (or --strict error).
    other_classes: test images of the folder's classes a subset run left out, near-OOD as in the SIO code
    (ImageNet-10 vs the other 990 classes, ImageNet-Dogs vs non-dogs)."""
    plan = {name: ('near', None) for name in BENCHMARKS.get(dataset, {}).get('near', [])}
    plan.update({name: ('far', None) for name in BENCHMARKS.get(dataset, {}).get('far', [])})
    if args.no_tin:
        plan.pop('tin', None)
    for group, flags in (('near', args.near), ('far', args.far)):
        for flag in flags:
            name, path = flag.split('=', 1)
            plan[name] = (group, path)
    sets = {}
    for name, (group, path) in plan.items():
        images = None
        if path is not None:
            files = image_files(path)
            images = read_files(files, size) if files else None
        elif dataset == 'digits':
            images = digits_ood(name)
        elif args.openood_root and (Path(args.openood_root) / 'benchmark_imglist' / dataset / f'test_{name}.txt').exists():
            images = read_files(read_imglist(args.openood_root, f'{dataset}/test_{name}.txt')[0], size)
        elif name != 'tin':
            images = torchvision_ood(name, args.data_root, size)
        if images is None or len(images) == 0:
            how = (f'pass --{group} {name}=PATH (an image folder)' if name == 'tin' or path
                   else f'put it under {os.path.abspath(args.data_root)} (torchvision format), pass --{group} {name}=PATH, or --openood-root')
            if args.strict:
                fail(f'OOD set {name} is missing: {how}')
            print(f'warning: skipping OOD set {name} ({group}): not found; {how}', file=sys.stderr)
            continue
        sets[name] = (group, images)
    if other_classes:
        sets = {'other-classes': ('near', read_files(other_classes, size)), **sets}
    return sets


# ----------------------------------------------------------------------------------------------
# Checkpoints and the network pass

def load_checkpoint(path):
    """A run directory (its best.pt) or a .pt of SPEC section 1 -> (checkpoint dict, run name)."""
    path = Path(path)
    file = path / 'best.pt' if path.is_dir() else path
    if not file.is_file():
        fail(f'{path} is neither a run directory with best.pt nor a checkpoint file')
    try:
        ckpt = torch.load(file, map_location='cpu', weights_only=False)
    except Exception as e:
        fail(f'{file} is not a readable torch checkpoint ({type(e).__name__}); pass a best.pt written by train_sio.py or train_oal.py')
    needed = ['model', 'arch', 'num_classes', 'classes', 'dataset', 'image_size', 'mean', 'std']
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        fail(f'{file} is not a synth-ood checkpoint (needs keys {", ".join(needed)}); pass a best.pt written by train_sio.py or train_oal.py')
    return ckpt, (path.name if path.is_dir() else path.stem), file


def build_model(ckpt, device):
    model = Net(ckpt['arch'], ckpt['num_classes'])
    model.load_state_dict(ckpt['model'])
    return model.to(device).to(memory_format=torch.channels_last).eval()


def shard(n, rank, world):
    return np.arange(rank, n, world)


def gather(array, world):
    """Re-interleave rank-sharded rows (rank r holds rows r, r+world, ...) into the full array."""
    if world == 1:
        return array
    parts = [None] * world
    dist.all_gather_object(parts, array)
    out = np.empty((sum(len(p) for p in parts),) + array.shape[1:], dtype=array.dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


@torch.no_grad()
def forward_all(model, images, ckpt, device, batch_size, bf16, rank=0, world=1, desc=''):
    """One pass over uint8 images -> (logits, features) as float32 numpy, sharded across ranks.
    float32 by default, as OpenOOD scores: bf16 moves AUROC and FPR@95 (README); --bf16 opts in for speed."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    idx = shard(len(images), rank, world)
    # filled in place: at ImageNet-1K the train features alone are 1.28M x 2048 float32 (10 GB)
    logits = np.empty((len(idx), model.fc.out_features), dtype=np.float32)
    feats = np.empty((len(idx), model.feature_dim), dtype=np.float32)
    for i in tqdm(range(0, len(idx), batch_size), desc=desc, leave=False, disable=rank != 0):
        x = torch.from_numpy(images[idx[i:i + batch_size]]).to(device).permute(0, 3, 1, 2)
        with autocast:
            z, h = model(normalize(x, ckpt['mean'], ckpt['std'], ckpt['image_size']), features=True)
        logits[i:i + len(x)], feats[i:i + len(x)] = z.float().cpu().numpy(), h.float().cpu().numpy()
    return gather(logits, world), gather(feats, world)


def normalize(x, mean, std, size):
    """uint8 images (or float ones on the same 0..255 scale, e.g. PixMix's) -> normalised float at size, channels_last."""
    x = x.float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    x = (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last)


def odin_scores(model, images, ckpt, device, batch_size, temperature, eps, rank=0, world=1):
    """ODIN (Liang et al. 2018): max softmax(f(x')/T), x' = x - eps * sign(grad_x CE(f(x)/T, argmax))."""
    std = torch.tensor(ckpt['std'], device=device).view(1, 3, 1, 1)
    idx = shard(len(images), rank, world)
    scores = []
    for i in tqdm(range(0, len(idx), batch_size), desc='odin', leave=False, disable=rank != 0):
        x = normalize(torch.from_numpy(images[idx[i:i + batch_size]]).to(device).permute(0, 3, 1, 2), ckpt['mean'], ckpt['std'], ckpt['image_size'])
        x.requires_grad_(True)
        logits = model(x)
        F.cross_entropy(logits / temperature, logits.argmax(1)).backward()
        # OpenOOD: sign with 0 -> +1, and the step in pixel units becomes eps/std in normalised units
        step = torch.where(x.grad >= 0, 1.0, -1.0) / std
        with torch.no_grad():
            scores.append(F.softmax(model(x - eps * step) / temperature, dim=1).max(1).values.cpu())
    return gather(torch.cat(scores).numpy() if scores else np.zeros(0, np.float32), world)


# ----------------------------------------------------------------------------------------------
# Detectors: fit statistics once from ID train / val outputs, then score = f(logits, features);
# higher = more in-distribution. (z logits, p softmax, h penultimate feature, W/b last layer.)

def energy(z):
    return torch.logsumexp(z, dim=1)


CHUNK_VALUES = 2 ** 24  # float64 values per chunk when streaming over train features (128 MB)


def train_moments(h, y, num_classes, with_scatter=True, rows=None):
    """One chunked pass over float32 train features -> float64 (mean, class means, class counts, scatter),
    scatter = sum_i (h_i - mean)(h_i - mean)^T (None unless asked). Rows are shifted by the first chunk's
    mean before the products, so the scatter keeps its digits however large the mean is; no float64
    copy of h is made."""
    rows = rows or max(1, CHUNK_VALUES // h.shape[1])
    shift = h[:rows].double().mean(0)
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
    """The statistics the requested detectors need (and only those), from ID train and val outputs.
    Train features stay float32 (ImageNet-1K: 10 GB); sums and covariances are float64."""
    detectors = set(args.detectors)
    h_tr, z_tr, y_tr = train['features'], train['logits'], train['labels']
    h_val, z_val, y_val = val['features'], val['logits'].double(), val['labels']
    C, d = W.shape
    stats = dict(W=W, b=b)
    if 'tempscale' in detectors:
        # T fitted on val by NLL, as OpenOOD does it (T from 1.5, LBFGS lr 0.01, 50 iterations). On a
        # val set the model classifies perfectly the NLL keeps falling as T -> 0; the fixed budget is
        # what keeps T finite, so it is kept.
        temperature = torch.full((), 1.5, dtype=torch.float64, device=z_val.device, requires_grad=True)
        opt = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)

        def nll():
            opt.zero_grad()
            loss = F.cross_entropy(z_val / temperature, y_val)
            loss.backward()
            return loss
        opt.step(nll)
        stats['temperature'] = temperature.item()
    if 'klm' in detectors:  # mean softmax of the val samples predicted as each class (classes never predicted are left out)
        p_val, pred_val = F.softmax(z_val, 1), z_val.argmax(1)
        stats['klm_means'] = torch.stack([p_val[pred_val == c].mean(0) for c in range(C) if (pred_val == c).any()])
    if 'react' in detectors:  # clip at the 90th percentile of all ID val activations (np.percentile, as OpenOOD)
        stats['react_clip'] = float(np.percentile(h_val.float().cpu().numpy(), args.react_percentile))
    if detectors & {'dice', 'mds', 'rmds', 'vim'}:
        mean, class_means, counts, scatter = train_moments(h_tr, y_tr, C, with_scatter=bool(detectors & {'mds', 'rmds', 'vim'}))
    if 'dice' in detectors:  # keep the weights whose contribution (mean train h * W) is in the top 10%
        contrib = mean[None, :] * W
        stats['dice_W'] = W * (contrib > float(np.percentile(contrib.cpu().numpy(), args.dice_percentile)))
    if detectors & {'mds', 'rmds'}:  # class means and the tied covariance = total minus between-class scatter
        between = (class_means - mean).T @ ((class_means - mean) * counts[:, None])
        stats['mds_means'], stats['mds_prec'] = class_means, torch.linalg.pinv((scatter - between) / len(h_tr), hermitian=True)
    if 'rmds' in detectors:  # the class-agnostic Gaussian
        stats['rmds_mean'], stats['rmds_prec'] = mean, torch.linalg.pinv(scatter / len(h_tr), hermitian=True)
    if 'knn' in detectors:  # the bank is the train features themselves, normalised block by block when scoring
        stats['knn_bank'] = h_tr  # --knn-k <= the train size: checked before any network pass (main, --bench-features)
    if 'vim' in detectors:
        # origin u = -pinv(W) b; covariance of h - u around 0 (OpenOOD: EmpiricalCovariance(assume_centered=True));
        # residual space = eigenvectors outside the top-D principal subspace
        D = args.vim_dim or (256 if d > 256 else d // 2)
        if not 0 < D < d:
            fail(f'--vim-dim {D} must be between 1 and {d - 1} (the feature size is {d})')
        u = -torch.linalg.pinv(W) @ b
        eigvals, eigvecs = torch.linalg.eigh(scatter / len(h_tr) + torch.outer(mean - u, mean - u))
        residual_space = eigvecs[:, torch.argsort(eigvals, descending=True)[D:]]
        rows = max(1, CHUNK_VALUES // d)
        residual_norm = sum(torch.linalg.norm((h_tr[i:i + rows].double() - u) @ residual_space, dim=1).sum() for i in range(0, len(h_tr), rows))
        max_logit = sum(z_tr[i:i + rows].double().max(1).values.sum() for i in range(0, len(z_tr), rows))
        stats.update(vim_u=u, vim_ns=residual_space, vim_alpha=(max_logit / residual_norm).item())
    return stats


def mahalanobis(h, means, prec):
    """(N, C) squared Mahalanobis distances to each mean under one precision matrix, as matrix
    products (h'Ph - 2h'Pmu + mu'Pmu), so no (N, C, d) tensor is ever built."""
    hp = h @ prec
    return (hp * h).sum(1, keepdim=True) - 2 * hp @ means.T + ((means @ prec) * means).sum(1)[None, :]


def klm_score(p, class_means):
    """-min_c KL(p || m_c) = -(sum p log p - max_c p . log m_c), without an (N, C, C) tensor."""
    return -((p * p.clamp_min(1e-30).log()).sum(1) - (p @ class_means.clamp_min(1e-30).log().T).max(1).values)


def knn_score(h, bank, k, block=2 ** 25):
    """-distance to the k-th nearest L2-normalised train feature. Queries x bank in blocks of at most
    `block` similarities (ImageNet-1K at once: 50k x 1.28M = 256 GB); each bank block is normalised as
    it is used, so the train features are never copied; a running top-k merges the blocks."""
    q = F.normalize(h.float(), dim=1)
    n_query = max(1, min(len(q), 4096, block // k))
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


def ash_b(h, percentile):
    """ASH-B: keep the top (100-p)% activations of each sample, all set to sum(h)/k; the rest 0."""
    k = h.shape[1] - int(round(h.shape[1] * percentile / 100))
    top = h.topk(k, dim=1).indices
    return torch.zeros_like(h).scatter_(1, top, (h.sum(1, keepdim=True) / k).expand(-1, k))


SCORES = {
    'msp': lambda z, h, s, a: F.softmax(z, 1).max(1).values,
    'mls': lambda z, h, s, a: z.max(1).values,
    'ebo': lambda z, h, s, a: a.ebo_temperature * energy(z / a.ebo_temperature),  # T = 1 unless --ebo-temperature / --aps
    'tempscale': lambda z, h, s, a: F.softmax(z / s['temperature'], 1).max(1).values,
    'gen': lambda z, h, s, a: -(lambda p: (p ** a.gen_gamma * (1 - p) ** a.gen_gamma).sum(1))(F.softmax(z, 1).sort(1).values[:, -min(100, z.shape[1]):]),
    'klm': lambda z, h, s, a: klm_score(F.softmax(z, 1), s['klm_means']),
    'react': lambda z, h, s, a: energy(h.clamp(max=s['react_clip']) @ s['W'].T + s['b']),
    'ash': lambda z, h, s, a: energy(ash_b(h, a.ash_percentile) @ s['W'].T + s['b']),
    'dice': lambda z, h, s, a: energy(h @ s['dice_W'].T + s['b']),
    'mds': lambda z, h, s, a: -mahalanobis(h, s['mds_means'], s['mds_prec']).min(1).values,
    'rmds': lambda z, h, s, a: (-mahalanobis(h, s['mds_means'], s['mds_prec']) + mahalanobis(h, s['rmds_mean'][None], s['rmds_prec'])).max(1).values,
    'knn': lambda z, h, s, a: knn_score(h, s['knn_bank'], a.knn_k),
    'vim': lambda z, h, s, a: energy(z) - s['vim_alpha'] * torch.linalg.norm((h - s['vim_u']) @ s['vim_ns'], dim=1),
}


# Automatic parameter search (--aps): the SIO code's postprocessor_sweep lists, which are OpenOOD's (knn: K 50 only).
APS_GRIDS = {'ebo': {'ebo_temperature': [1.0, 10.0, 100.0, 1000.0]},
             'odin': {'odin_temperature': [1.0, 10.0, 100.0, 1000.0], 'odin_eps': [0.0014, 0.0028]},
             'knn': {'knn_k': [50]}}


def aps_search(det, args, id_scores, ood_scores):
    """Every setting of APS_GRIDS[det]; keeps the one with the highest AUROC of validation ID vs validation OOD scores
    (the last of equals, as OpenOOD). id_scores(a) / ood_scores(a) score them under settings a. --aps sio scores the ID
    side once under the flags' own setting, as the SIO code's evaluator (OpenOOD v1.0) did. -> (settings, record)"""
    fixed_id = id_scores(args) if args.aps == 'sio' else None
    best = None
    for values in itertools.product(*APS_GRIDS[det].values()):
        setting = dict(zip(APS_GRIDS[det], values))
        a = argparse.Namespace(**{**vars(args), **setting})
        auroc = ood_metrics(fixed_id if fixed_id is not None else id_scores(a), ood_scores(a))['AUROC']
        if best is None or auroc >= best[0]:
            best = (auroc, a, setting)
    return best[1], dict(best[2], val_auroc=round(best[0], 4))


# ----------------------------------------------------------------------------------------------
# Metrics (OpenOOD v1.5): OOD is the positive class, scores are "higher = more ID".

def ood_metrics(id_scores, ood_scores):
    is_ood = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    s = np.r_[id_scores, ood_scores].astype(np.float64)
    fpr, tpr, _ = skm.roc_curve(is_ood, -s)
    fpr_id, tpr_id, _ = skm.roc_curve(1 - is_ood, s)  # classic: OOD accepted when 95% of ID is accepted
    precision_in, recall_in, _ = skm.precision_recall_curve(1 - is_ood, s)
    precision_out, recall_out, _ = skm.precision_recall_curve(is_ood, -s)
    return dict(FPR95=100 * fpr[np.argmax(tpr >= 0.95)], AUROC=100 * skm.roc_auc_score(is_ood, -s),
                AUPR_IN=100 * skm.auc(recall_in, precision_in), AUPR_OUT=100 * skm.auc(recall_out, precision_out),
                FPR95_ID=100 * fpr_id[np.argmax(tpr_id >= 0.95)])


def run_table(scores, groups, acc):
    """{dataset | near | far: {metric: value}} for one run and one detector."""
    table = {name: dict(ood_metrics(scores['id'], scores[name]), ACC=acc) for name in groups}
    for group in ('near', 'far'):
        names = [n for n, g in groups.items() if g == group]
        if names:
            table[group] = {m: float(np.mean([table[n][m] for n in names])) for m in METRICS}
    return table


def aggregate(tables):
    """Mean and std over runs of {dataset: {metric: value}} -> {dataset: {metric, metric_std}}."""
    out = {}
    for row in tables[0]:
        out[row] = {}
        for m in METRICS:
            values = [t[row][m] for t in tables]
            out[row][m], out[row][f'{m}_std'] = float(np.mean(values)), float(np.std(values))
    return out


def cell(row, metric, runs):
    return f'{row[metric]:.2f}' + (f' ± {row[metric + "_std"]:.2f}' if runs > 1 else '')


def format_tables(results, groups, runs):
    """Markdown: one OpenOOD table per detector, then the summary (SIO paper's shape)."""
    lines = []
    covers = {g: ', '.join(n for n, gg in groups.items() if gg == g) or 'none' for g in ('near', 'far')}
    for det, table in results.items():
        lines += [f'### {det}', '', '| dataset | ' + ' | '.join(METRIC_TITLES[m] for m in METRICS) + ' |', '|---' * (len(METRICS) + 1) + '|']
        for row in table:
            label = f'**{row}** ({covers[row]})' if row in ('near', 'far') else row
            lines.append(f'| {label} | ' + ' | '.join(cell(table[row], m, runs) for m in METRICS) + ' |')
        lines.append('')
    lines += [f'### summary ({runs} run{"s" if runs > 1 else ""}; near = {covers["near"]}; far = {covers["far"]})', '',
              '| detector | near AUROC | far AUROC | near FPR@95 | far FPR@95 | ACC |', '|---|---|---|---|---|---|']
    for det, table in results.items():
        get = lambda g, m: cell(table[g], m, runs) if g in table else '-'
        lines.append(f'| {det} | {get("near", "AUROC")} | {get("far", "AUROC")} | {get("near", "FPR95")} | {get("far", "FPR95")} | '
                     f'{cell(next(iter(table.values())), "ACC", runs)} |')
    return '\n'.join(lines) + '\n'


def save_plots(scores, groups, detectors, out_dir):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    for det in detectors:
        fig, axes = plt.subplots(1, len(groups) + 1, figsize=(4 * (len(groups) + 1), 3.2))
        for ax, name in zip(axes, groups):
            ax.hist(scores[det]['id'], bins=50, alpha=0.6, density=True, label='ID', histtype='stepfilled')  # one polygon instead of 50 bars
            ax.hist(scores[det][name], bins=50, alpha=0.6, density=True, label=name, histtype='stepfilled')
            ax.set_title(f'{det}: ID vs {name}')
            ax.legend()
        for name in groups:
            is_ood = np.r_[np.zeros(len(scores[det]['id'])), np.ones(len(scores[det][name]))]
            fpr, tpr, _ = skm.roc_curve(is_ood, -np.r_[scores[det]['id'], scores[det][name]])
            axes[-1].plot(fpr, tpr, label=name)
        axes[-1].plot([0, 1], [0, 1], 'k:')
        axes[-1].set(title=f'{det}: ROC (OOD positive)', xlabel='FPR', ylabel='TPR')
        axes[-1].legend()
        fig.subplots_adjust(left=0.04, right=0.99, bottom=0.16, top=0.9, wspace=0.25)  # fixed margins: tight_layout took a third of the time
        fig.savefig(out_dir / f'{det}.png', dpi=80)
        plt.close(fig)


def parse_settings(specs):
    """Positional RUN arguments, or NAME=RUN,RUN,... groups (one group per setting) -> {setting: [runs]}."""
    if not any('=' in spec for spec in specs):
        return {'': list(specs)}
    if not all('=' in spec for spec in specs):
        fail('mix of plain runs and NAME=RUN,... settings: give every argument as NAME=RUN[,RUN...] or none')
    settings = {}
    for spec in specs:
        name, runs = spec.split('=', 1)
        settings[name] = [r for r in runs.split(',') if r]
    return settings


def write_atomic(path, write):
    """write(tmp) then rename over path: a crash or a full disk never leaves half a file under the final name."""
    tmp = temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        fail(f'could not write {path} ({e}); the previous {Path(path).name}, if any, is intact: free some space or pass another --out')


def save_npz(path, **arrays):
    with open(path, 'wb') as f:  # a file object: np.savez would add .npz to a temporary name
        np.savez(f, **arrays)


def file_digest(path):
    """sha256 of a file's bytes (first 16 hex digits)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()[:16]


def array_digest(*arrays):
    """sha256 of arrays' dtypes, shapes and bytes (first 16 hex digits), without copying them."""
    digest = hashlib.sha256()
    for array in map(np.ascontiguousarray, arrays):
        digest.update(f'{array.dtype}{array.shape}'.encode())
        digest.update(memoryview(array).cast('B'))
    return digest.hexdigest()[:16]


def score_runs(checkpoints, split_images, oods, groups, args, device, rank, world):
    """Network passes (cached) and detector scores for each run -> ({detector: [table per run]}, scores, seconds)."""
    time_net = time_det = 0.0
    tables, scores_out, aps_picks = {d: [] for d in args.detectors}, {}, {}
    for ckpt, run, ckpt_file in checkpoints:
        model = build_model(ckpt, device)
        outputs, t0 = {}, time.time()
        splits = {'train': split_images['train'], 'val': split_images['val'], 'id': split_images['test']}
        splits.update({name: (images, np.full(len(images), -1)) for name, (_, images) in oods.items()})
        if args.aps:
            splits['aps_ood'] = split_images['aps_ood']
        weights = file_digest(ckpt_file) if args.cache else None
        for split, (images, labels) in splits.items():
            cache_file = Path(args.cache) / run / f'{split}.npz' if args.cache else None
            # keyed by what determines the outputs: the checkpoint's bytes, the images and labels, the precision
            fingerprint = f"{weights}:{array_digest(images, labels)}:{'bf16' if args.bf16 else 'fp32'}" if args.cache else None
            if cache_file and cache_file.exists():
                try:
                    with np.load(cache_file) as cached:
                        if str(cached['source']) == fingerprint and len(cached['labels']) == len(labels):
                            outputs[split] = dict(logits=cached['logits'], features=cached['features'], labels=cached['labels'])
                            continue
                except Exception as e:  # damaged outside this script (BadZipFile, missing key...): computed again and rewritten
                    print(f'note: cache {cache_file} is unreadable ({type(e).__name__}); computing it again', file=sys.stderr)
            logits, feats = forward_all(model, images, ckpt, device, args.batch_size, args.bf16, rank, world, desc=f'{run}/{split}')
            outputs[split] = dict(logits=logits, features=feats, labels=np.asarray(labels))
            if cache_file and rank == 0:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(cache_file, lambda tmp: save_npz(tmp, source=fingerprint, **outputs[split]))
        odin, det_args, picks = {}, {det: args for det in args.detectors}, {}
        if 'odin' in args.detectors:  # every rank takes part in ODIN's passes, the search's included
            run_odin = lambda split, a: odin_scores(model, splits[split][0], ckpt, device, args.batch_size, a.odin_temperature, a.odin_eps, rank, world)
            if args.aps == 'sio':  # the ID test side stays at the default setting, for the search and the table: one pass
                odin['id'] = run_odin('id', args)
            if args.aps:
                det_args['odin'], picks['odin'] = aps_search('odin', args, lambda a: odin['id'] if args.aps == 'sio' else run_odin('val', a),
                                                             lambda a: run_odin('aps_ood', a))
            for split in [s for s in ['id'] + list(oods) if s not in odin]:
                odin[split] = run_odin(split, det_args['odin'])
        time_net += time.time() - t0
        if rank != 0:
            continue
        t0 = time.time()
        # train and val stay float32 (fit() accumulates in float64); each scored split becomes float64 in turn
        on_device = lambda o: dict(features=torch.from_numpy(o['features']).to(device), logits=torch.from_numpy(o['logits']).to(device),
                                   labels=torch.from_numpy(np.asarray(o['labels'])).to(device).long())
        W, b = (p.detach().to(device).double() for p in (model.fc.weight, model.fc.bias))
        stats = fit(on_device(outputs['train']), on_device(outputs['val']), W, b, args)
        acc = 100 * float((outputs['id']['logits'].argmax(1) == outputs['id']['labels']).mean())
        scores = {det: {} for det in args.detectors}
        as_tensors = lambda split: [torch.from_numpy(outputs[split][k]).to(device).double() for k in ('logits', 'features')]
        for det in [d for d in args.detectors if args.aps and d in APS_GRIDS and d != 'odin']:
            score = lambda split, a: SCORES[det](*as_tensors(split), stats, a).cpu().numpy()
            det_args[det], picks[det] = aps_search(det, args, lambda a: score('id' if args.aps == 'sio' else 'val', a), lambda a: score('aps_ood', a))
        if picks:
            aps_picks[run] = picks
            print(f'aps ({args.aps}) {run}: ' + '; '.join(f'{det} ' + ', '.join(f'{k} {v}' for k, v in p.items()) for det, p in picks.items()))
        for split in ['id'] + list(oods):
            z, h = as_tensors(split)
            for det in args.detectors:  # --aps sio: the ID side keeps the default setting, as the SIO code's evaluator
                a = args if split == 'id' and args.aps == 'sio' else det_args[det]
                scores[det][split] = odin[split] if det == 'odin' else SCORES[det](z, h, stats, a).cpu().numpy()
        for det in args.detectors:
            scores_out.setdefault(det, {})[run] = scores[det]
            tables[det].append(run_table(scores[det], groups, acc))
        time_det += time.time() - t0
    return tables, scores_out, time_net, time_det, aps_picks


def compare_table(all_results, runs_per_setting):
    """One row per (detector, setting): the table the quickstart ends with."""
    lines = ['| detector | setting | near AUROC | far AUROC | near FPR@95 | far FPR@95 | ACC |', '|---|---|---|---|---|---|---|']
    for det in next(iter(all_results.values())):
        for setting, results in all_results.items():
            t, n = results[det], runs_per_setting[setting]
            get = lambda g, m: cell(t[g], m, n) if g in t else '-'
            lines.append(f'| {det} | {setting} | {get("near", "AUROC")} | {get("far", "AUROC")} | {get("near", "FPR95")} | {get("far", "FPR95")} | '
                         f'{cell(next(iter(t.values())), "ACC", n)} |')
    return '\n'.join(lines) + '\n'


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


def bench_features(args):
    """--bench-features N,D,C[,M]: time fit + score of each detector on synthetic ReLU features (N train
    rows, D dims, C classes, M test rows; ODIN needs a network and is left out) with the peak memory
    (resident memory on a CPU, allocated GPU memory on CUDA)."""
    try:
        N, D, C, M = (int(v) for v in (args.bench_features.split(',') + ['10000'])[:4])
        assert min(N, D, C, M) >= 1 and N >= args.knn_k
    except (ValueError, AssertionError):
        fail(f'--bench-features takes N,D,C[,M], positive integers with N >= --knn-k, e.g. 200000,2048,1000; got {args.bench_features!r}')
    device, gen = torch.device(args.device), torch.Generator().manual_seed(0)
    # one-time costs come first, not inside a detector's row: the first LBFGS step of a process takes ~1 GB
    tiny = dict(features=torch.ones(2, 2), logits=torch.zeros(2, 2), labels=torch.arange(2))
    fit(tiny, tiny, torch.eye(2), torch.zeros(2), argparse.Namespace(detectors=['tempscale']))
    memory_start = peak_memory_gb(device, reset=True)
    centres = 2 * torch.randn(C, D, generator=gen)
    W, b = torch.randn(C, D, generator=gen, dtype=torch.float64) / D ** 0.5, 0.1 * torch.randn(C, generator=gen, dtype=torch.float64)

    def outputs(n):
        labels, features = torch.randint(C, (n,), generator=gen), torch.empty(n, D)
        for i in range(0, n, 8192):
            features[i:i + 8192] = (centres[labels[i:i + 8192]] + torch.randn(len(labels[i:i + 8192]), D, generator=gen)).clamp_min_(0)
        logits = torch.cat([h @ W.T.float() + b.float() for h in features.split(8192)])
        return dict(features=features.to(device), logits=logits.to(device), labels=labels.to(device))
    train, val, test = outputs(N), outputs(min(N, 10000)), outputs(M)
    W, b = W.to(device), b.to(device)
    z, h = test['logits'].double(), test['features'].double()
    features_gb = N * D * 4 / 2 ** 30
    data_gb = peak_memory_gb(device, reset=True) - memory_start  # what every row holds anyway: train/val/test features and logits
    print(f'synthetic outputs: train {N:,} x {D} features ({features_gb:.2f} GB float32) + {C} logits, val {len(val["labels"]):,}, '
          f'test {M:,}; device {device}; {data_gb:.2f} GB held in all')
    print('| detector | fit s | score s | peak GB above the held outputs |\n|---|---|---|---|')
    worst = 0.0
    for det in [d for d in args.detectors if d != 'odin']:
        peak_memory_gb(device, reset=True)
        t0 = time.time()
        stats = fit(train, val, W, b, argparse.Namespace(**dict(vars(args), detectors=[det])))
        t1 = time.time()
        SCORES[det](z, h, stats, args)
        t2 = time.time()
        extra = max(0.0, peak_memory_gb(device) - memory_start - data_gb)
        worst = max(worst, extra)
        print(f'| {det} | {t1 - t0:.2f} | {t2 - t1:.2f} | {extra:.2f} |')
    print(f'peak = held outputs + {worst:.2f} GB = {(data_gb + worst) / features_gb:.2f} x the train feature array')


def main(argv=None):
    args = get_args(argv)
    if args.bench_features:
        return bench_features(args)
    if not args.bf16:  # OpenOOD scores in float32: no TF32 in the convolutions or matmuls that feed the detectors
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ddp = int(os.environ.get('WORLD_SIZE', 1)) > 1
    if ddp:  # rank-sharded network passes; rank 0 scores and writes
        rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        use_cuda = args.device.startswith('cuda')
        dist.init_process_group('nccl' if use_cuda else 'gloo')
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else 'cpu')
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device(args.device)
    master = rank == 0
    for folder in (args.out, args.plots, args.cache):
        if folder and master:
            check_out(folder)
    if args.out and master:
        lock_folder(Path(args.out) / '.lock')
        done = (Path(args.out) / 'results.json').exists() and not args.overwrite
        claim_out(args.out, lambda e: e.name in RESULT_FILES or is_temporary(e, RESULT_FILES), 'the results of an earlier evaluation' if done else None,
                  'pass --overwrite to replace them, or another --out')
    settings = {name: [load_checkpoint(r) for r in runs] for name, runs in parse_settings(args.runs).items()}
    checkpoints = [c for runs in settings.values() for c in runs]
    names = [name for _, name, _ in checkpoints]
    if len(set(names)) != len(names):
        fail(f'two runs share the name {max(names, key=names.count)!r}: runs are named by their directory or file stem, rename one')
    dataset = args.dataset or checkpoints[0][0]['dataset']
    for ckpt, name, _ in checkpoints:
        if args.dataset is None and ckpt['dataset'] != dataset:
            fail(f"runs mix datasets ({ckpt['dataset']} in {name}, {dataset} in {names[0]}): evaluate one dataset at a time")

    # ---------------------------------------------------------------- data (once for all runs)
    t_start = time.time()
    folder = dataset.startswith('folder:')
    classes = checkpoints[0][0].get('classes') if folder else None  # a folder run may hold a subset of the folder's classes (--classes)
    for ckpt, name, _ in checkpoints:
        if folder and ckpt.get('classes') != classes:
            fail(f'runs were trained on different classes ({name} vs {names[0]}): evaluate one class set at a time')
    ds = load_dataset(dataset, args.data_root, args.openood_root, classes)
    for ckpt, name, _ in checkpoints:
        if ckpt['num_classes'] != len(ds['classes']):
            fail(f"{name} has {ckpt['num_classes']} classes but --dataset {dataset} has {len(ds['classes'])}: "
                 f"evaluate it on the dataset it was trained on ({ckpt['dataset']})")
        d = ckpt['model']['fc.weight'].shape[1]
        if 'vim' in args.detectors and args.vim_dim is not None and not 1 <= args.vim_dim < d:
            fail(f'--vim-dim {args.vim_dim} must be between 1 and {d - 1} (the feature size of {name} is {d})')
    if 'knn' in args.detectors and args.knn_k > len(ds['train'][1]):
        fail(f"--knn-k {args.knn_k} is larger than the {len(ds['train'][1])} ID train features: pass a smaller --knn-k")
    size = checkpoints[0][0]['image_size'] if folder else ds['image_size']
    split_images = {split: (read_files(ds[split][0], size) if folder else ds[split][0], ds[split][1]) for split in ('train', 'val', 'test')}
    oods = ood_sets(dataset, size, args, ds.get('other_classes'))
    if args.aps:  # validation OOD images for the search, never part of the table
        files = image_files(args.aps_ood) if args.aps_ood else []
        if not args.aps_ood and args.openood_root and (Path(args.openood_root) / 'benchmark_imglist' / dataset / 'val_tin.txt').exists():
            files = read_imglist(args.openood_root, f'{dataset}/val_tin.txt')[0]
        if not files:
            fail(f"--aps needs validation OOD images: pass --aps-ood PATH (an image folder{'; none found in ' + args.aps_ood if args.aps_ood else ''}) "
                 f"or --openood-root with its val_tin list")
        split_images['aps_ood'] = (read_files(files, size), np.full(len(files), -1))
    groups = {name: group for name, (group, _) in oods.items()}
    if not groups:
        fail(f'no OOD set available for {dataset}: pass --near NAME=PATH / --far NAME=PATH')
    if master:
        print(f'{dataset}: ID test {len(split_images["test"][1]):,}, ' + ', '.join(f'{n} ({g}) {len(oods[n][1]):,}' for n, g in groups.items()))

    # ---------------------------------------------------------------- network passes, scores, report
    all_results, all_scores, reports, time_net, time_det, aps_picks = {}, {}, [], 0.0, 0.0, {}
    for setting, runs in settings.items():
        tables, scores, t_net, t_det, picks = score_runs(runs, split_images, oods, groups, args, device, rank, world)
        aps_picks.update(picks)
        time_net, time_det = time_net + t_net, time_det + t_det
        if master:
            all_results[setting] = {det: aggregate(tables[det]) for det in args.detectors}
            all_scores.update({f'{run}/{det}/{split}': s for det, by_run in scores.items() for run, by_split in by_run.items()
                               for split, s in by_split.items()})
            reports.append((f'## {setting}\n\n' if setting else '') + format_tables(all_results[setting], groups, len(runs)))
    if not master:
        dist.destroy_process_group()
        return
    report = '\n'.join(reports)
    if len(settings) > 1:
        report += f'\n## comparison (near = {", ".join(n for n, g in groups.items() if g == "near")}; far = {", ".join(n for n, g in groups.items() if g == "far")}; ' \
                  f'mean ± std over runs)\n\n' + compare_table(all_results, {s: len(r) for s, r in settings.items()})
    print(report)
    print(f'time: {time.time() - t_start:.1f}s in all; network passes {time_net:.1f}s, detectors {time_det:.1f}s '
          f'({len(checkpoints)} run(s), {len(args.detectors)} detectors, device {device})')
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = dict(runs={s: [n for _, n, _ in r] for s, r in settings.items()}, dataset=dataset,
                    near=[n for n, g in groups.items() if g == 'near'], far=[n for n, g in groups.items() if g == 'far'])
        if args.aps:  # what the search chose, per run and detector, with its validation AUROC
            meta['aps'] = dict(mode=args.aps, ood=args.aps_ood or 'val_tin (OpenOOD list)', picks=aps_picks)
        results = all_results[''] if '' in all_results else all_results  # one setting: detector -> ...; several: setting -> detector -> ...
        rows = [['setting', 'detector', 'dataset'] + [k for m in METRICS for k in (m, f'{m}_std')]]
        rows += [[setting, det, row] + [f'{values[k]:.4f}' for m in METRICS for k in (m, f'{m}_std')]
                 for setting, by_det in all_results.items() for det, table in by_det.items() for row, values in table.items()]
        csv_text = io.StringIO()
        csv.writer(csv_text).writerows(rows)
        for name, text in (('results.json', json.dumps(dict(results, _meta=meta), indent=1)), ('results.md', report),
                           ('results.csv', csv_text.getvalue())):
            write_atomic(out / name, lambda tmp: Path(tmp).write_text(text))
        write_atomic(out / 'scores.npz', lambda tmp: save_npz(tmp, **all_scores))
        print(f'wrote {out}/results.json, results.csv, results.md, scores.npz')
    if args.plots:
        first = names[0]
        save_plots({det: {split: all_scores[f'{first}/{det}/{split}'] for split in ['id'] + list(groups)} for det in args.detectors},
                   groups, args.detectors, Path(args.plots))
        print(f'wrote {len(args.detectors)} plots ({first}) to {args.plots}')
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
