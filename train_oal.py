"""OAL: train an OOD-aware classifier with latent-space outliers, a mutual-information module and distillation.

Paper: "Enhancing OOD Detection Using Latent Diffusion" (Outlier-Aware Learning), Gao et al.,
arXiv 2406.16525 (code: HengGao12/OAL, a fork of OpenOOD).
Idea: outliers synthesized in Stable Diffusion's latent space (generate.py oal) are cheap and few;
CLUB upper bounds on the mutual information between outliers and the student's ID features push the
two apart (MICL), and distillation from a strong frozen teacher keeps ID accuracy from dropping.

    L = CE(z_s, y) + 4 KL(p_t || p_s) + 8 KL(softmax(DT(h_t)) || softmax(h_s))
        + 0.1 CLUB(o_knn, h_s) + 0.2 CLUB(o_diff, h_s)

    python train_oal.py --dataset digits                           # teacher/init runs/digits_ce_s0, outliers/digits
    python train_oal.py --dataset digits --seed 0,1,2 --init 'runs/digits_ce_s{seed}' --out 'runs/digits_oal_s{seed}'  # one process
    python train_oal.py --dataset cifar10 --init runs/cifar100_ce_224  # teacher: the ViT-B/16 of TEACHERS; init: the authors' CIFAR-100 CE
    python train_oal.py --dataset cifar10 --club alternating                    # the CLUB estimator as designed
    python train_oal.py --dataset cifar10 --w-knn 0 --w-diff 0                  # ablation: distillation only
    torchrun --nproc_per_node=4 train_oal.py --dataset cifar100 ...
Evaluate with: python evaluate.py runs/<dataset>_oal_s0 --detectors ebo (the paper's score)
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

RECIPE_AUGMENT = {'digits': (1, False), 'cifar10': (4, True), 'cifar100': (4, True), 'folder': (0, True)}  # (crop pad, flip) as in training
MIN_LR = 1e-8  # OAL's per-iteration cosine ends at 1e-8 for the student (every group is scaled by the same factor)
TEACHERS = {  # the paper's teacher, a ViT-B/16 fine-tuned on the ID set at 224, as public transformers classifiers
    'cifar10': 'aaraki/vit-base-patch16-224-in21k-finetuned-cifar10',  # model card: 97.88% on its eval split, 95.07% verified on the test set
    'cifar100': 'jialicheng/vit-base-patch16-224-in21k-cifar100-13',  # model card: 91.96% on its eval split
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', default='digits', help='digits | cifar10 | cifar100 | folder:PATH')
    p.add_argument('--data-root', default='./data')
    p.add_argument('--openood-root', default=None, help="OpenOOD's data dir: use its val/test lists")
    p.add_argument('--teacher', default=None, help='transformers image classifier (hub id or folder), run dir or .pt of ours, or baseline '
                                                     '(= runs/<dataset>_ce_s0). Default: the ViT-B/16 of TEACHERS for cifar10/100 (the paper), else baseline')
    p.add_argument('--teacher-class-order', default='auto', choices=['auto', 'ignore'],
                   help="auto: match the teacher's label names to the dataset's classes; ignore: take its outputs in the dataset's order")
    p.add_argument('--teacher-min-acc', type=float, default=0.5, help="stop when the teacher's val top-1 is below this (it does not fit the data)")
    p.add_argument('--crop', default='published', choices=['published', 'native'],
                   help='published: resize to the training size, then flip and pad-crop there (+-4 px at 224); native: pad-crop at the '
                        "dataset's size, then upsample (+-28 px at 224; this repository's earlier order)")
    p.add_argument('--init', default=None, help="student's starting checkpoint, as the paper (default runs/<dataset>_ce_s0; 'none' = scratch)")
    p.add_argument('--outliers', default=None, help='folder from generate.py oal (default outliers/<dataset>)')
    p.add_argument('--arch', default=None, help="student arch (default: the --init checkpoint's, else as train_sio.py)")
    p.add_argument('--image-size', type=int, default=None, help="student resolution (default: the --init checkpoint's; the paper trains at 224)")
    p.add_argument('--w-kd', type=float, default=4.0)
    p.add_argument('--w-feat', type=float, default=8.0)
    p.add_argument('--w-knn', type=float, default=0.1)
    p.add_argument('--w-diff', type=float, default=0.2)
    p.add_argument('--club', default='joint', choices=['joint', 'alternating'],
                   help='joint (faithful): q-networks minimise the same loss; alternating: fit q by likelihood, then minimise CLUB')
    p.add_argument('--epochs', type=int, default=None, help='default 100 (30 for digits)')
    p.add_argument('--batch-size', type=int, default=None, help='default 128 (64 for digits)')
    p.add_argument('--lr', type=float, default=0.005, help='student lr (DT: --lr-dt, q-networks: --lr-q)')
    p.add_argument('--lr-dt', type=float, default=0.01)
    p.add_argument('--lr-q', type=float, default=1e-4)
    p.add_argument('--weight-decay', type=float, default=5e-4)
    p.add_argument('--seed', default='0', help='an integer, or several (0,1,2): one run per seed, one after another in this process; '
                                               '{seed} in --out and --init stands for each')
    p.add_argument('--out', default=None, help='run directory (default runs/<dataset>_oal_s<seed>)')
    p.add_argument('--resume', action='store_true', help='continue from OUT/last.pt (from scratch while there is none yet)')
    p.add_argument('--overwrite', action='store_true', help='start afresh over the run in --out (replaces only best.pt, last.pt, log.jsonl)')
    p.add_argument('--stop-after', type=int, default=None, help='leave after this many epochs in this call (--resume continues)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--compile', action='store_true')
    args = p.parse_args(argv)
    tag = args.dataset.replace(':', '_').replace('/', '_')
    digits = args.dataset == 'digits'
    args.epochs = args.epochs if args.epochs is not None else 30 if digits else 100
    args.batch_size = args.batch_size if args.batch_size is not None else 64 if digits else 128
    world = int(os.environ.get('WORLD_SIZE', 1))
    weight = ('a number >= 0', lambda v: 0 <= v < math.inf)
    check_ranges(args, [
        ('--w-kd', *weight), ('--w-feat', *weight), ('--w-knn', *weight), ('--w-diff', *weight),
        ('--epochs', 'an integer >= 1', lambda v: v >= 1),
        ('--batch-size', f'an integer >= {2 * world} (DT\'s BatchNorm needs 2 images per process)', lambda v: v >= 2 * world),
        ('--lr', 'a number > 0', lambda v: 0 < v < math.inf),
        ('--lr-dt', 'a number > 0', lambda v: 0 < v < math.inf),
        ('--lr-q', 'a number > 0', lambda v: 0 < v < math.inf),
        ('--weight-decay', 'a number >= 0', lambda v: 0 <= v < math.inf),
        ('--teacher-min-acc', 'in [0, 1]', lambda v: 0 <= v <= 1),
        ('--stop-after', 'an integer >= 1 (epochs to run in this call)', lambda v: v >= 1),
    ])
    if args.arch is not None and args.arch not in ARCH_SIZE:
        fail(f'unknown --arch {args.arch!r}: use resnet18, resnet18_224, resnet50 or cnn')
    check_device(args.device)
    args.teacher = args.teacher or TEACHERS.get(args.dataset, 'baseline')
    args.teacher = f'runs/{tag}_ce_s0' if args.teacher == 'baseline' else args.teacher
    args.init = args.init or f'runs/{tag}_ce_s0'
    args.outliers = args.outliers or f'outliers/{tag}'
    args.seeds = parse_seeds(args.seed)
    args.out = args.out or f'runs/{tag}_oal_s{{seed}}'
    if len(args.seeds) > 1 and '{seed}' not in args.out:
        fail(f'--seed {args.seed} makes one run per seed: put {{seed}} in --out (e.g. {args.out}_s{{seed}})')
    return args


def parse_seeds(text):
    """--seed 0, or several distinct seeds: 0,1,2."""
    parts = text.split(',')
    if not all(p.strip().isdigit() and int(p) < 2 ** 32 for p in parts) or len({int(p) for p in parts}) < len(parts):
        fail(f'--seed must be an integer in [0, 2**32) or distinct ones separated by commas (0,1,2), got {text!r}')
    return [int(p) for p in parts]


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


def read_checkpoint(file, what):
    """torch.load with one line for a file that is cut short, not a checkpoint, or not one of ours."""
    try:
        ckpt = torch.load(file, map_location='cpu', weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, empty file...
        fail(f'{what} {file} cannot be read ({type(e).__name__}; cut short?): pass a best.pt or last.pt written by train_sio.py or train_oal.py')
    if not isinstance(ckpt, dict) or not {'model', 'arch', 'num_classes', 'dataset'} <= ckpt.keys():
        fail(f'{what} {file} is not a synth-ood checkpoint (no model/arch/num_classes/dataset): pass a best.pt or last.pt written by train_sio.py or train_oal.py')
    return ckpt


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
ARCH_MIN_SIZE = {'cnn': 8, 'resnet18': 8, 'resnet18_224': 32, 'resnet50': 32}  # cnn: the digits' 8x8; ResNets: their total downsampling

def normalize(x, mean, std, size):
    """uint8 images (or float ones on the same 0..255 scale, e.g. PixMix's) -> normalised float at size, channels_last."""
    x = x.float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    x = (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last)


def augment(x, pad, flip, size=None):
    """Random crop with zero padding + horizontal flip, per image, on whatever device x lives on (uint8 in and out).
    With size, the images are resized to it first, so the crop shifts them by +-pad pixels at the training size:
    OpenOOD's Resize(224), RandomHorizontalFlip, RandomCrop(224, padding=4), which OAL trained with."""
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x.float(), size=(size, size), mode='bilinear', align_corners=False).round().clamp(0, 255).to(torch.uint8)
    n, _, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
        rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x


def offline_if_unreachable():
    """Without a network, hub ids load from the local cache at once: huggingface_hub would otherwise retry for
    about 25 s, printing every attempt, before the one-line error."""
    import socket
    import urllib.parse
    import huggingface_hub.constants as hub
    try:
        socket.create_connection((urllib.parse.urlparse(hub.ENDPOINT).hostname, 443), timeout=3).close()
    except OSError:
        hub.HF_HUB_OFFLINE = True


def load_teacher(spec, device, classes, class_order='auto'):
    """A synth-ood checkpoint (run dir or .pt) or a transformers image classifier (hub id or folder), checked
    against the dataset's classes. Returns (forward(uint8 NCHW at any size) -> (logits in the dataset's class
    order, pre-logit features), info). The teacher sees the images resized to its own input size and normalised
    with its own statistics (a ViT fine-tuned with mean = std = 0.5 would be fed out-of-range inputs otherwise)."""
    path = Path(spec)
    ckpt_file = path / 'best.pt' if path.is_dir() and (path / 'best.pt').exists() else path if path.suffix == '.pt' else None
    if ckpt_file is not None:
        if not ckpt_file.exists():
            fail(f'teacher {ckpt_file} does not exist: train one with python train_sio.py --dataset DATASET --out {path.parent if path.suffix else path}')
        ckpt = read_checkpoint(ckpt_file, 'teacher')
        model = Net(ckpt['arch'], ckpt['num_classes'])
        model.load_state_dict(ckpt['model'])
        model = model.to(device).eval().requires_grad_(False)
        mean, std, size, names = ckpt['mean'], ckpt['std'], ckpt['image_size'], ckpt.get('classes')
        run = lambda x: model(x, features=True)
        info = dict(kind='checkpoint', name=str(ckpt_file), feature_dim=model.feature_dim)
    else:
        if path.is_dir() and (path / 'last.pt').exists() and not (path / 'config.json').exists():
            fail(f'teacher {path} has last.pt but no best.pt: pass {path / "last.pt"} to distil from its last epoch')
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        if not path.is_dir():
            offline_if_unreachable()
        try:
            model = AutoModelForImageClassification.from_pretrained(spec).to(device).eval().requires_grad_(False)
        except Exception as e:
            if path.is_dir():
                where = f'the folder {spec} is not a transformers image classifier ({type(e).__name__})'
            elif spec.count('/') != 1 or spec.startswith(('.', '/', '~')):
                where = 'there is no such path'
            else:
                where = (f'it is no local path and did not load as a hub id ({type(e).__name__}; offline?); fetch it where there is a network '
                         f'(huggingface-cli download {spec} --local-dir DIR) and pass --teacher DIR')
            fail(f'cannot load teacher {spec!r}: {where}; or pass a transformers model folder, a run directory, a .pt, or --teacher baseline')
        try:  # the teacher's own preprocessing, from its preprocessor_config.json
            processor = AutoImageProcessor.from_pretrained(spec)
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
            size = processor.size.get('height') or processor.size.get('shortest_edge') or model.config.image_size
        except Exception:  # no preprocessor config: ViT's defaults
            mean, std, size = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), model.config.image_size
        size = size if isinstance(size, int) else size[0]
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        head = model.classifier if hasattr(model, 'classifier') else model.get_output_embeddings()
        captured = {}
        head.register_forward_hook(lambda module, inputs, output: captured.__setitem__('h', inputs[0]))
        run = lambda x: (model(pixel_values=x).logits, captured['h'])  # the head's input is the pre-logit feature (ViT: the normalised [CLS] token)
        info = dict(kind='transformers', name=spec, feature_dim=head.in_features)
    if len(names or classes) != len(classes):
        fail(f'teacher {spec} has {len(names)} classes but the dataset has {len(classes)}: pass a teacher trained on this dataset')
    order = teacher_class_order(names, classes, class_order, spec)
    order = order if order is None else order.to(device)

    def forward(x):
        logits, h = run(normalize(x, mean, std, size))
        return (logits if order is None else logits[:, order]), h
    return forward, dict(info, image_size=size, mean=list(mean), std=list(std), num_classes=len(classes), module=model,
                         class_order='as the dataset' if order is None else order.tolist())


def teacher_class_order(names, classes, mode, spec):
    """Indices that put the teacher's logits in the dataset's class order, matched by name (case, '_' and '-'
    ignored); None when they are in order already, or when the teacher's labels carry no names (LABEL_3, 3) or
    mode is 'ignore': the accuracy check then catches a wrong order. Names that do not match are an error."""
    canon = lambda name: ' '.join(re.split(r'[\s_\-]+', str(name).strip().lower()))
    if mode == 'ignore' or names is None or all(re.fullmatch(r'(label )?\d+', canon(n)) for n in names):
        return None
    theirs, ours = [canon(n) for n in names], [canon(c) for c in classes]
    missing = [c for c, name in zip(classes, ours) if name not in theirs]
    if missing or len(set(theirs)) != len(theirs):
        problem = f'no class named {missing[0]!r}' if missing else 'a label twice'
        fail(f"teacher {spec} has {problem} (its labels: {', '.join(map(str, names[:4]))}, ...): pass a teacher trained on this "
             f"dataset, or --teacher-class-order ignore if its outputs are in the dataset's class order under other names")
    order = [theirs.index(name) for name in ours]
    return None if order == list(range(len(ours))) else torch.tensor(order)


@torch.no_grad()
def teacher_accuracy(forward, images, labels, device, min_acc, spec, dataset, batch_size=256):
    """The teacher's top-1 on (uint8 NHWC images, labels), stopping the run below min_acc: a teacher for other
    data, another label order or other preprocessing shows here, before any step is spent on it."""
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else nullcontext()
    correct = 0
    for i in range(0, len(labels), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).to(device)
        with autocast:
            correct += (forward(x)[0].argmax(1).cpu() == torch.as_tensor(labels[i:i + batch_size])).sum().item()
    accuracy = correct / len(labels)
    if accuracy < min_acc:
        fail(f'teacher {spec} gets {100 * accuracy:.1f}% top-1 on the {dataset} validation split, below --teacher-min-acc '
             f'{min_acc:g}: it does not fit this data (another dataset, label order or preprocessing); pass the right --teacher')
    return accuracy


# ----------------------------------------------------------------------------------------------
# The OAL modules: DT adapter (teacher feature -> student feature space) and the CLUB estimators.

def dt_adapter(d_t, d_s):
    return nn.Sequential(nn.BatchNorm1d(d_t), nn.Linear(d_t, d_s), nn.ReLU(), nn.BatchNorm1d(d_s))


class CLUB(nn.Module):
    """CLUB (Cheng et al. 2020): an upper bound of I(x; y) with a Gaussian q(y|x) = N(mu(x), exp(logvar(x)))."""

    def __init__(self, d_x, d_y, deep_mu=False):
        super().__init__()
        # OAL's diffusion-outlier CLUB (DEEP_CLUB) has a deeper mean network: d_x, d_x/2, d_x/4, 256, d_y (64-d latents: 32, 16)
        half, quarter = max(d_x // 2, 1), max(d_x // 4, 1)
        self.mu = (nn.Sequential(nn.Linear(d_x, half), nn.ReLU(), nn.Linear(half, quarter), nn.ReLU(), nn.Linear(quarter, 256), nn.ReLU(), nn.Linear(256, d_y))
                   if deep_mu else nn.Sequential(nn.Linear(d_x, 256), nn.ReLU(), nn.Linear(256, d_y)))
        self.logvar = nn.Sequential(nn.Linear(d_x, 256), nn.ReLU(), nn.Linear(256, d_y), nn.Tanh())

    def forward(self, x, y):
        """mean_i (pos_i - neg_i): pos_i = -sum_d (mu_i - y_i)^2 / 2 var_i, neg_i = -sum_d mean_j (y_j - mu_i)^2 / 2 var_i."""
        mu, logvar = self.mu(x), self.logvar(x)
        pos = -((mu - y) ** 2 / 2 / logvar.exp()).sum(1)
        neg = -(((y[None, :, :] - mu[:, None, :]) ** 2).mean(1) / 2 / logvar.exp()).sum(1)
        return (pos - neg).mean()

    def log_likelihood(self, x, y):
        """What q maximises in the alternating scheme: -sum (mu - y)^2 / var - sum logvar, batch mean."""
        mu, logvar = self.mu(x), self.logvar(x)
        return (-((mu - y) ** 2) / logvar.exp() - logvar).sum(1).mean()


def kl_teacher_student(student_logits, teacher_logits):
    """KL(softmax(teacher) || softmax(student)), batchmean, T = 1."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1), reduction='batchmean')


def oal_loss(z_s, h_s, y, z_t, dt_h_t, o_knn, o_diff, club_knn, club_diff, args):
    """The OAL objective (SPEC 3.5), term by term; returns (total, {term: value})."""
    terms = dict(
        ce=F.cross_entropy(z_s, y),
        kd=kl_teacher_student(z_s, z_t),
        feat=kl_teacher_student(h_s, dt_h_t),  # softmax over feature dimensions; DT(h_t) not detached (faithful)
        club_knn=club_knn(o_knn, h_s),
        club_diff=club_diff(o_diff, h_s),
    )
    total = terms['ce'] + args.w_kd * terms['kd'] + args.w_feat * terms['feat'] + args.w_knn * terms['club_knn'] + args.w_diff * terms['club_diff']
    return total, terms


def fit_q_step(optimizer, club_knn, club_diff, o_knn, o_diff, h_s, world=1):
    """--club alternating: one ascent step of the q-networks' log-likelihood on detached features.
    Parameters without a gradient (student, DT) are skipped by SGD, so only q moves."""
    optimizer.zero_grad(set_to_none=True)
    loss = -(club_knn.log_likelihood(o_knn, h_s.detach()) + club_diff.log_likelihood(o_diff, h_s.detach()))
    loss.backward()
    average_gradients([club_knn, club_diff], world)
    optimizer.step()
    return -loss.detach()


def distinct(pool_size, n, device):
    """n random indices into a pool, distinct while the pool lasts: OAL takes torch.randperm(pool)[:n] at every step.
    A pool smaller than n (tiny runs) is gone through again in a new order."""
    return torch.cat([torch.randperm(pool_size, device=device) for _ in range(-(-n // pool_size))])[:n]


def average_gradients(modules, world):
    """DDP for the small side modules: all-reduce their gradients by hand (they are called twice a step)."""
    if world > 1:
        for p in (p for m in modules for p in m.parameters() if p.grad is not None):
            dist.all_reduce(p.grad)
            p.grad /= world


def read_meta(path):
    """A set's meta.json as a dict; None when there is none (SIO's released npy pair has none)."""
    try:
        return json.loads((path / 'meta.json').read_text()) if (path / 'meta.json').exists() else None
    except (ValueError, OSError) as e:
        fail(f'{path}/meta.json cannot be read ({type(e).__name__}): rerun the generate.py command that made {path}, or remove meta.json')


def load_npy(file, mmap_mode=None):
    """np.load with one line for a truncated or pickled (object) array (mmap_mode='r': read from disk as used)."""
    try:
        return np.load(file, mmap_mode=mmap_mode)  # allow_pickle=False: an object array is refused, not unpickled
    except (ValueError, OSError, EOFError) as e:
        fail(f'{file} cannot be read as a numeric .npy ({e}): rewrite it, e.g. rerun the generate.py command that made it')


def check_set_meta(path, dataset, classes, command):
    """A set from generate.py against the real data, by its meta.json (none: nothing to check): finished, made
    for these classes and this dataset (folder datasets: the classes decide). Returns the meta dict or None."""
    meta = read_meta(path) if path.is_dir() else None
    if meta is None:
        return None
    if meta.get('complete', True) is not True:  # generate.py writes complete: false until its last image
        so_far = f"{sum(meta['counts'])} images so far, " if meta.get('counts') else ''
        fail(f'{path} is unfinished ({so_far}meta.json complete: false): run the same generate.py {command} command again (it resumes), then train')
    if 'classes' in meta and list(meta['classes']) != list(classes):
        fail(f"{path} was generated for classes {meta['classes'][:4]}... but --dataset {dataset} has {classes[:4]}...: generate it for this --dataset")
    if meta.get('dataset', dataset) != dataset and not dataset.startswith('folder:'):
        fail(f"{path} was generated for --dataset {meta['dataset']}, not {dataset}: generate it for this --dataset")
    return meta


def load_outliers(folder, dataset, classes, teacher_dim):
    """The outlier folder checked before any step: finished, made for these classes and this teacher's feature size."""
    folder, num_classes = Path(folder), len(classes)
    knn_file, diff_file = folder / 'knn_outliers.npy', folder / 'diffusion_outliers.npy'
    check_set_meta(folder, dataset, classes, 'oal')
    if not knn_file.exists() or not diff_file.exists():
        fail(f'{folder} has no knn_outliers.npy/diffusion_outliers.npy: make them with '
             f'python generate.py oal --dataset DATASET --teacher TEACHER --out {folder}')
    knn, diff = load_npy(knn_file), load_npy(diff_file)
    if knn.ndim != 3 or knn.shape[0] != num_classes or knn.shape[1] == 0:
        fail(f'{knn_file} has shape {knn.shape}, expected ({num_classes}, M >= 1, d): generate it for this --dataset')
    if knn.shape[2] != teacher_dim:
        fail(f'{knn_file} holds {knn.shape[2]}-d outliers but the teacher has {teacher_dim}-d features: '
             f'generate them with the same --teacher (generate.py oal --teacher ...)')
    if diff.ndim != 2 or 0 in diff.shape:
        fail(f'{diff_file} has shape {diff.shape}, expected (N, L) pooled latents: rerun generate.py oal')
    for file, array in ((knn_file, knn), (diff_file, diff)):
        if array.dtype.kind != 'f' or not np.isfinite(array).all():
            fail(f'{file} must hold finite floats, got {array.dtype}{" with NaN/inf" if array.dtype.kind == "f" else ""}: rerun generate.py oal')
    return torch.from_numpy(knn.reshape(-1, knn.shape[2])).float(), torch.from_numpy(diff).float()


def save_atomic(obj, path):
    """Write a temporary file, then rename it over path: a crash or a full disk never leaves half a file."""
    tmp = temporary(path)
    try:
        if isinstance(obj, str):
            Path(tmp).write_text(obj)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError from its zip writer
        tmp.unlink(missing_ok=True)
        fail(f'could not write {path} ({e}); the previous {Path(path).name}, if any, is intact: free some space or pass another --out')


def write_log(rows, path):
    save_atomic(''.join(json.dumps(r) + '\n' for r in rows), path)


RUN_FILES = ('best.pt', 'last.pt', 'log.jsonl')  # all a trainer writes in its --out (and name.PID.tmp while writing)


def claim_run_folder(out, resume, overwrite, script):
    """A trainer's --out under claim_out's rule: a run there continues with --resume or starts afresh with --overwrite."""
    if resume and overwrite:
        fail('--resume continues the run in --out and --overwrite starts it afresh: pass one of them')
    lock_folder(out / '.lock')
    finished = [name for name in ('last.pt', 'best.pt') if (out / name).exists()]
    if finished and (resume or overwrite):
        method = read_checkpoint(out / finished[0], f'--out {out}:').get('method')
        if (method == 'oal') != (script == 'train_oal.py'):
            fail(f"--out {out} holds a {'train_oal.py' if method == 'oal' else 'train_sio.py'} run, not a {script} one: pass another --out")
    mine = lambda entry: entry.is_file() and (entry.name in RUN_FILES or is_temporary(entry, RUN_FILES))
    held = f"a run ({', '.join(finished)})" if finished and not (resume or overwrite) else None
    claim_out(out, mine, held, 'pass --resume to continue it, --overwrite to start afresh, or another --out')
    for entry in list(out.iterdir()):  # this process holds the lock: temporary files there are a killed run's
        if is_temporary(entry, RUN_FILES) or (overwrite and entry.name in RUN_FILES):
            entry.unlink()


RUN_FLAGS = ('dataset', 'openood_root', 'teacher', 'teacher_class_order', 'crop', 'init', 'outliers', 'arch', 'image_size', 'w_kd', 'w_feat',
             'w_knn', 'w_diff', 'club', 'epochs', 'batch_size', 'lr', 'lr_dt', 'lr_q', 'weight_decay', 'seed')  # what --resume must match


def check_resume(state, run, out):
    """--resume continues only the same run: every flag that changes the result, and the same data set, as in last.pt."""
    if 'run' not in state or 'log' not in state:
        fail(f'--resume: {out}/last.pt was written by an older synth-ood that did not record its settings: start again with a new --out')
    stored = state['run']
    changed = [f"{'--' + k.replace('_', '-') if k in RUN_FLAGS else k} {stored.get(k)!r} -> {v!r}" for k, v in run.items() if stored.get(k) != v]
    if changed:
        fail(f"--resume: {out}/last.pt was trained with other settings ({'; '.join(changed)}): resume with its flags, or pass a new --out")


@torch.no_grad()
def accuracy(model, images, labels, ds, size, device, rank=0, world=1):
    """Top-1 on this rank's share of (images, labels); summed across ranks under DDP."""
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


def main(argv=None):
    args = get_args(argv)
    ddp = int(os.environ.get('WORLD_SIZE', 1)) > 1
    if ddp:
        rank, world, local_rank = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
        use_cuda = args.device.startswith('cuda')
        dist.init_process_group('nccl' if use_cuda else 'gloo')
        device = torch.device(f'cuda:{local_rank}' if use_cuda else 'cpu')
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device(args.device)
    run_args = {k: v for k, v in vars(args).items() if k != 'seeds'}
    for seed in args.seeds:  # one run per seed, each exactly as if started alone; one process saves the start-up of the others
        named = {flag: getattr(args, flag).replace('{seed}', str(seed)) for flag in ('out', 'init')}
        if len(args.seeds) > 1 and rank == 0:
            print(f"== seed {seed} -> {named['out']}")
        train(argparse.Namespace(**dict(run_args, seed=seed, **named)), ddp, rank, world, device)
    if ddp:
        dist.destroy_process_group()


def train(args, ddp, rank, world, device):
    """One run of args.seed into args.out."""
    master = rank == 0
    out = Path(args.out)
    for flag in ('teacher', 'init'):  # distilling from a run must never write over it
        source = Path(getattr(args, flag))
        if source.exists() and source.resolve() in (out.resolve(), out.resolve() / 'best.pt', out.resolve() / 'last.pt'):
            fail(f'--out {out} is the --{flag} run: pass another --out (the OAL run is written beside its teacher, not over it)')
    if master:
        check_out(out)
        claim_run_folder(out, args.resume, args.overwrite, 'train_oal.py')
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---------------------------------------------------------------- data, teacher, outliers
    ds = load_dataset(args.dataset, args.data_root, args.openood_root)
    if args.dataset.startswith('folder:'):
        fail('train_oal.py keeps the training set in memory; image-folder datasets are not supported yet (use CIFAR or digits)')
    num_classes = len(ds['classes'])
    tag = args.dataset.replace(':', '_').replace('/', '_')
    if args.teacher == f'runs/{tag}_ce_s0' and not Path(args.teacher).exists():
        fail(f'no teacher at the default {args.teacher}: train the baseline with python train_sio.py --dataset {args.dataset} '
             f'--out {args.teacher}, or pass --teacher RUN_OR_TRANSFORMERS_MODEL')
    teacher, teacher_info = load_teacher(args.teacher, device, ds['classes'], args.teacher_class_order)
    teacher_acc = teacher_accuracy(teacher, ds['val'][0], ds['val'][1], device, args.teacher_min_acc, args.teacher, args.dataset)
    if master:
        print(f"teacher {teacher_info['name']}: val top-1 {100 * teacher_acc:.2f}% on {args.dataset} (inputs {teacher_info['image_size']}px, "
              f"mean {[round(m, 4) for m in teacher_info['mean']]}, std {[round(s, 4) for s in teacher_info['std']]}; class order {teacher_info['class_order'] if isinstance(teacher_info['class_order'], str) else 'permuted by name'})")
    init = None
    if args.init != 'none':
        init_file = Path(args.init) / 'best.pt' if Path(args.init).is_dir() else Path(args.init)
        if not init_file.exists():
            fail(f'--init {args.init} not found: train the cross-entropy baseline first with '
                 f'python train_sio.py --dataset {args.dataset} --out {args.init}, or pass --init none to start from scratch')
        init = read_checkpoint(init_file, '--init')
    args.arch = args.arch or (init['arch'] if init else {'digits': 'cnn'}.get(args.dataset, 'resnet18'))
    args.image_size = args.image_size or (init['image_size'] if init else (ds['image_size'] if args.dataset == 'digits' else ARCH_SIZE[args.arch]))
    if init and init['arch'] != args.arch:
        fail(f"--init {args.init} is a {init['arch']}, not --arch {args.arch}: drop --arch or pass a matching --init")
    if args.image_size < ARCH_MIN_SIZE[args.arch]:
        fail(f'--image-size must be at least {ARCH_MIN_SIZE[args.arch]} for --arch {args.arch}, got {args.image_size}')
    knn_pool, diff_pool = (t.to(device) for t in load_outliers(args.outliers, args.dataset, ds['classes'], teacher_info['feature_dim']))
    pad, flip = RECIPE_AUGMENT.get(args.dataset, (4, True))
    crop_size = args.image_size if args.crop == 'published' else None  # published: resize, flip, crop pad 4 at the training size
    train_x = torch.from_numpy(ds['train'][0]).permute(0, 3, 1, 2).contiguous().to(device)
    train_y = torch.from_numpy(ds['train'][1]).to(device)
    val_x = torch.from_numpy(ds['val'][0]).permute(0, 3, 1, 2).contiguous().to(device)
    val_y = torch.from_numpy(ds['val'][1]).to(device)
    steps_per_epoch = math.ceil(len(train_y) / args.batch_size)
    if len(train_y) - (steps_per_epoch - 1) * args.batch_size < 2 * world:  # a last batch too small for DT's BatchNorm is left out
        steps_per_epoch -= 1

    # ---------------------------------------------------------------- student, DT, CLUBs, optimiser
    student = Net(args.arch, num_classes)
    if init and init['dataset'] == args.dataset and init['num_classes'] == num_classes:
        student.load_state_dict(init['model'])
    elif init:  # OAL initialises the student from a CIFAR-100 CE checkpoint for CIFAR-10 too: the backbone carries over
        student.body.load_state_dict({k[len('body.'):]: v for k, v in init['model'].items() if k.startswith('body.')})
        if master:
            print(f"--init {args.init}: backbone from its {init['dataset']} training ({init['num_classes']} classes), "
                  f'classifier head initialised afresh for {num_classes} classes')
    student = student.to(device).to(memory_format=torch.channels_last)
    d_s, d_t = student.feature_dim, teacher_info['feature_dim']
    dt = dt_adapter(d_t, d_s).to(device)
    club_knn = CLUB(knn_pool.shape[1], d_s).to(device)
    club_diff = CLUB(diff_pool.shape[1], d_s, deep_mu=True).to(device)
    q_params = list(club_knn.parameters()) + list(club_diff.parameters())
    optimizer = torch.optim.SGD([dict(params=student.parameters(), lr=args.lr), dict(params=dt.parameters(), lr=args.lr_dt),
                                 dict(params=q_params, lr=args.lr_q)], momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    total_steps = args.epochs * steps_per_epoch
    floor = MIN_LR / args.lr  # OAL's cosine_annealing(step, total, 1, 1e-8 / lr): one factor for every group
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    start_epoch, best_acc, log = 0, -1.0, []
    run = {k: os.path.abspath(v) if k in ('openood_root', 'teacher', 'init', 'outliers') and v and Path(v).exists() else v
           for k, v in vars(args).items() if k in RUN_FLAGS}
    run['outlier set'] = read_meta(Path(args.outliers))
    if args.resume and not (out / 'last.pt').exists() and master:
        print(f'--resume: no {out}/last.pt yet, starting at epoch 1')
    if args.resume and (out / 'last.pt').exists():
        state = read_checkpoint(out / 'last.pt', '--resume:')
        if state.get('method') != 'oal' or 'dt' not in state:
            fail(f'--resume: {out}/last.pt is not a train_oal.py run (method {state.get("method")}): pass the --out of a train_oal.py run')
        check_resume(state, run, out)
        student.load_state_dict(state['model'])
        for module, key in ((dt, 'dt'), (club_knn, 'club_knn'), (club_diff, 'club_diff')):
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        start_epoch, best_acc, log = state['epoch'], state['best_val_acc'], state['log']
        if master:  # the log rows travel inside last.pt, so a crash between the two writes loses no row
            write_log(log, out / 'log.jsonl')
            print(f'resumed from {out}/last.pt after epoch {start_epoch}')
    raw_student = student
    if args.compile:  # the teacher's network too: it runs once per step, as many images as the student
        student = torch.compile(student)
        teacher_info['module'].forward = torch.compile(teacher_info['module'].forward)
    if ddp:
        student = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == 'cuda' else None)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else nullcontext()
    if master:
        print(f"OAL: student {args.arch}@{args.image_size} ({'init ' + str(args.init) if init else 'scratch'}), teacher {teacher_info['name']} "
              f"({d_t}-d), outliers {args.outliers}: knn {tuple(knn_pool.shape)}, diffusion {tuple(diff_pool.shape)}; club {args.club}")

    def checkpoint(epoch, val_acc, full):
        ckpt = dict(model=raw_student.state_dict(), arch=args.arch, num_classes=num_classes, classes=ds['classes'], dataset=args.dataset,
                    image_size=args.image_size, mean=ds['mean'], std=ds['std'], epoch=epoch, val_acc=val_acc, args=vars(args), method='oal',
                    teacher=dict(name=teacher_info['name'], val_acc=teacher_acc))
        if full:  # bf16 autocast needs no GradScaler; the key is kept for the format
            ckpt.update(dt=dt.state_dict(), club_knn=club_knn.state_dict(), club_diff=club_diff.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=None, best_val_acc=best_acc, run=run, log=log,
                        rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate()))
        return ckpt

    # ---------------------------------------------------------------- training
    stop_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    if master:
        print(f"{'epoch':>5} {'loss':>8} {'ce':>7} {'kd':>7} {'feat':>7} {'c_knn':>7} {'c_diff':>7} {'train':>7} {'val':>7} {'img/s':>7}")
    for epoch in range(start_epoch, stop_epoch):
        # Every random draw of an epoch derives from (seed, epoch, rank): a resumed run repeats it exactly.
        torch.manual_seed((args.seed * 1000 + epoch) * 1000 + rank)
        perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).to(device)
        student.train()
        dt.train()
        sums = {k: torch.zeros((), device=device) for k in ('loss', 'ce', 'kd', 'feat', 'club_knn', 'club_diff', 'correct', 'seen')}
        t0 = time.time()
        bar = tqdm(range(steps_per_epoch), desc=f'epoch {epoch + 1}/{args.epochs}', disable=not master, leave=False, dynamic_ncols=True)
        for step in bar:
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size][rank::world]
            x, y = augment(train_x[idx], pad, flip, crop_size), train_y[idx]
            n = len(y)
            o_knn, o_diff = knn_pool[distinct(len(knn_pool), n, device)], diff_pool[distinct(len(diff_pool), n, device)]  # random (outlier, ID sample) pairs
            with torch.no_grad(), autocast:
                z_t, h_t = teacher(x)
            with autocast:
                z_s, h_s = student(normalize(x, ds['mean'], ds['std'], args.image_size), features=True)
            z_s, h_s, z_t, h_t = z_s.float(), h_s.float(), z_t.float(), h_t.float()
            if args.club == 'alternating':
                fit_q_step(optimizer, club_knn, club_diff, o_knn, o_diff, h_s, world)
            loss, terms = oal_loss(z_s, h_s, y, z_t, dt(h_t), o_knn, o_diff, club_knn, club_diff, args)
            if not torch.isfinite(loss):  # one sync per step, so the message can name the step
                bar.close()
                fail(f'loss is {loss.item()} at epoch {epoch + 1} step {step + 1}; '
                     + (f'{out}/last.pt holds epoch {epoch}, the last good one' if epoch else 'no epoch finished, so nothing was saved')
                     + ' (lower --lr)')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.club == 'alternating':  # q stays fixed while the student minimises the bound
                for p in q_params:
                    p.grad = None
            average_gradients([dt, club_knn, club_diff], world)
            optimizer.step()
            scheduler.step()
            for key, value in terms.items():
                sums[key] += value.detach() * n
            sums['loss'] += loss.detach() * n
            sums['correct'] += (z_s.argmax(1) == y).sum()
            sums['seen'] += n
            if step % 20 == 0:
                bar.set_postfix(loss=f'{loss.item():.3f}', img_s=f'{sums["seen"].item() * world / (time.time() - t0):.0f}')
        stats = torch.stack(list(sums.values()))
        if ddp:
            dist.all_reduce(stats)
        seconds = time.time() - t0
        totals = dict(zip(sums, stats.tolist()))
        val_acc = accuracy(raw_student, val_x, val_y, ds, args.image_size, device, rank, world)
        if master:
            row = dict(epoch=epoch + 1, **{k: totals[k] / totals['seen'] for k in ('loss', 'ce', 'kd', 'feat', 'club_knn', 'club_diff')},
                       train_acc=totals['correct'] / totals['seen'], val_acc=val_acc, lr=scheduler.get_last_lr()[0],
                       images_per_s=totals['seen'] / seconds, seconds=seconds)
            log.append(row)
            print(f"{epoch + 1:>5} {row['loss']:>8.4f} {row['ce']:>7.4f} {row['kd']:>7.4f} {row['feat']:>7.4f} {row['club_knn']:>7.3f} "
                  f"{row['club_diff']:>7.3f} {100 * row['train_acc']:>6.2f}% {100 * val_acc:>6.2f}% {row['images_per_s']:>7.0f}")
            if val_acc > best_acc:
                best_acc = val_acc
                save_atomic(checkpoint(epoch + 1, val_acc, full=False), out / 'best.pt')
            save_atomic(checkpoint(epoch + 1, val_acc, full=True), out / 'last.pt')
            write_log(log, out / 'log.jsonl')
    if master:
        print(f'best val acc {100 * best_acc:.2f}% -> {out}/best.pt')


if __name__ == '__main__':
    main()
