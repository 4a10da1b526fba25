"""SIO: train an OOD-ready classifier on real + synthetic in-distribution images.

Paper: "SIO: Synthetic In-Distribution Data Benefits Out-of-Distribution Detection", Zhang et al.,
arXiv 2303.14531 (code: zjysteven/SIO, a fork of OpenOOD).
Idea: no outlier data at all. A generative model makes more labelled ID images, and every batch
holds int(B*alpha) real and B - int(B*alpha) synthetic images under one cross-entropy, so the
classifier sees a denser ID manifold and post-hoc detectors (MSP, energy, KNN, ViM...) improve.
Without --synthetic this is the plain cross-entropy baseline (and the teacher / init for OAL).

    # embedded benchmark, CPU, seconds
    python train_sio.py --dataset digits --out runs/digits_ce_s0
    python train_sio.py --dataset digits --synthetic samples/digits_sio --out runs/digits_sio_s0
    python train_sio.py --dataset digits --seed 0,1,2 --out 'runs/digits_ce_s{seed}'   # three seeds, one process
    # the paper's CIFAR recipe (ResNet-18, 200 epochs, B=128, alpha=0.8 -> 102 real + 26 synthetic)
    python train_sio.py --dataset cifar10 --out runs/c10_ce_s0
    python train_sio.py --dataset cifar10 --synthetic samples/c10_sio --out runs/c10_sio_s0
    torchrun --nproc_per_node=4 train_sio.py --dataset cifar100 --synthetic PATH --out runs/c100_sio
    # plug-in training methods the paper combined with SIO
    python train_sio.py --dataset cifar10 --synthetic PATH --method logitnorm|cutmix
    python train_sio.py --dataset cifar10 --synthetic PATH --method oe --oe-data PATH
    python train_sio.py --dataset cifar10 --synthetic PATH --method pixmix --mixing-set fractals_and_fvis/   # SIO's 92.94
    # ImageNet subsets of the SIO code (224, 60 epochs, B 256, alpha 0.9); evaluate.py scores the other classes as OOD
    python train_sio.py --dataset folder:data/imagenet --classes imagenet-10 --synthetic PATH
"""
import argparse
import json
import math
import os
import random
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

# Recipes: the paper's settings per kind of dataset. Every flag overrides its entry.
RECIPES = {
    'cifar':  dict(epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4, nesterov=True, alpha=0.8, pad=4, flip=True),
    'folder': dict(epochs=60, batch_size=256, lr=0.1, weight_decay=1e-4, nesterov=False, alpha=0.9, pad=0, flip=True),
    'digits': dict(epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4, nesterov=True, alpha=0.8, pad=1, flip=False),
}
MIN_LR = 1e-6  # per-iteration cosine from lr down to this (OpenOOD's cosine_annealing)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', default='digits', help='digits | cifar10 | cifar100 | folder:PATH')
    p.add_argument('--classes', default=None, help="folder datasets: these classes only: imagenet-10 or imagenet-dogs (the SIO code's subsets) or a file of class folder names")
    p.add_argument('--data-root', default='./data', help='where torchvision datasets live / are downloaded')
    p.add_argument('--openood-root', default=None, help="OpenOOD's data dir (benchmark_imglist/, images_classic/): use its val/test lists")
    p.add_argument('--arch', default=None, help='resnet18 | resnet18_224 | resnet50 | cnn (default: cnn for digits, resnet18 for CIFAR, resnet18_224 for folders)')
    p.add_argument('--image-size', type=int, default=None, help='train/test resolution (default: native for the arch)')
    p.add_argument('--crop', default='published', choices=['published', 'native'],
                   help='in-memory sets above their native size: published = resize to --image-size, then flip and pad-crop there '
                        "(OpenOOD at 224, +-4 px); native = pad-crop at the dataset's size, then upsample (+-28 px at 224)")
    p.add_argument('--synthetic', default=None, help='synthetic ID set: images.npy+labels.npy or zero-padded class folders (SPEC 1)')
    p.add_argument('--alpha', type=float, default=None, help='share of real images per batch (0.8 CIFAR, 0.9 folders); 1 = baseline')
    p.add_argument('--method', default='ce', choices=['ce', 'logitnorm', 'oe', 'cutmix', 'pixmix'])
    p.add_argument('--tau', type=float, default=0.04, help='LogitNorm temperature')
    p.add_argument('--oe-data', default=None, help='outlier images for --method oe: a .npy (N,H,W,3) uint8 or an image folder')
    p.add_argument('--oe-weight', type=float, default=0.5)
    p.add_argument('--oe-batch-size', type=int, default=None, help='outliers per step (default 2x batch, as in OE)')
    p.add_argument('--oe-augment', action='store_true', help='deviation: outliers get the training crop/flip, drawn with replacement '
                                                              '(default, as the SIO code: test transform, in order from a per-epoch permutation)')
    p.add_argument('--mixing-set', default=None, help="PixMix's mixing pictures for --method pixmix: a folder of images (e.g. its fractals_and_fvis)")
    p.add_argument('--pixmix-k', type=int, default=4, help='PixMix: at most this many mixing rounds per image (uniform in 0..k)')
    p.add_argument('--pixmix-beta', type=float, default=3.0, help='PixMix: mixing severity (the Beta distributions of the weights)')
    p.add_argument('--aug-severity', type=int, default=3, help='PixMix: severity of the AugMix operations, 1..10')
    p.add_argument('--pixmix-ops', default='all', choices=['all', 'base'], help='PixMix: all 13 AugMix ops, as the SIO code (OpenOOD all_ops: true); '
                                                                                'base = the 9 without color/contrast/brightness/sharpness, as PixMix\'s CIFAR script')
    p.add_argument('--epochs', type=int, default=None)
    p.add_argument('--batch-size', type=int, default=None)
    p.add_argument('--lr', type=float, default=None)
    p.add_argument('--weight-decay', type=float, default=None)
    p.add_argument('--seed', default='0', help='an integer, or several (0,1,2): one run per seed, one after another in this process; '
                                               '{seed} in --out stands for each')
    p.add_argument('--out', default=None, help='run directory (default runs/<dataset>_<method>[_sio]_s<seed>)')
    p.add_argument('--resume', action='store_true', help='continue from OUT/last.pt (from scratch while there is none yet)')
    p.add_argument('--overwrite', action='store_true', help='start afresh over the run in --out (replaces only best.pt, last.pt, log.jsonl)')
    p.add_argument('--stop-after', type=int, default=None, help='leave after this many epochs in this call (time-limited jobs; --resume continues)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument('--workers', type=int, default=8, help='DataLoader workers (image folders only)')
    args = p.parse_args(argv)
    kind = 'digits' if args.dataset == 'digits' else 'folder' if args.dataset.startswith('folder:') else 'cifar'
    for key, value in RECIPES[kind].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.arch = args.arch or {'digits': 'cnn', 'cifar': 'resnet18', 'folder': 'resnet18_224'}[kind]
    if args.arch not in ARCH_SIZE:
        fail(f'unknown --arch {args.arch!r}: use resnet18, resnet18_224, resnet50 or cnn')
    if args.synthetic is None:
        args.alpha = 1.0
    world = int(os.environ.get('WORLD_SIZE', 1))
    check_ranges(args, [
        ('--alpha', 'in (0, 1]', lambda v: 0 < v <= 1),
        ('--tau', 'a number > 0', lambda v: 0 < v < math.inf),
        ('--oe-weight', 'a number >= 0', lambda v: 0 <= v < math.inf),
        ('--oe-batch-size', f'an integer >= {world} (the number of processes)', lambda v: v >= world),
        ('--epochs', 'an integer >= 1', lambda v: v >= 1),
        ('--batch-size', f'an integer >= {world} (the number of processes)', lambda v: v >= world),
        ('--lr', 'a number > 0', lambda v: 0 < v < math.inf),
        ('--weight-decay', 'a number >= 0', lambda v: 0 <= v < math.inf),
        ('--pixmix-k', 'an integer >= 0', lambda v: v >= 0),
        ('--pixmix-beta', 'a number > 0', lambda v: 0 < v < math.inf),
        ('--aug-severity', 'an integer in 1..10', lambda v: 1 <= v <= 10),
        ('--stop-after', 'an integer >= 1 (epochs to run in this call)', lambda v: v >= 1),
        ('--workers', 'an integer >= 0', lambda v: v >= 0),
        ('--image-size', f'at least {ARCH_MIN_SIZE[args.arch]} for --arch {args.arch}', lambda v: v >= ARCH_MIN_SIZE[args.arch]),
    ])
    if args.synthetic and int(args.batch_size * args.alpha) < world:
        fail(f'--alpha {args.alpha} leaves {int(args.batch_size * args.alpha)} real images in a batch of {args.batch_size}: '
             f'raise --alpha or --batch-size')
    if args.classes and not args.dataset.startswith('folder:'):
        fail(f'--classes picks class folders of a folder:PATH dataset; --dataset {args.dataset} has fixed classes: drop --classes')
    check_device(args.device)
    if args.method == 'oe' and not args.oe_data:
        fail('--method oe needs outlier images: pass --oe-data PATH (a .npy of uint8 images or an image folder)')
    if args.method == 'pixmix' and not args.mixing_set:
        fail("--method pixmix needs mixing pictures: pass --mixing-set PATH (a folder of images, e.g. PixMix's fractals_and_fvis)")
    if args.mixing_set and args.method != 'pixmix':
        fail(f'--mixing-set is used by --method pixmix only (this run is --method {args.method}): drop it, or pass --method pixmix')
    args.seeds = parse_seeds(args.seed)
    args.out = args.out or f"runs/{args.dataset.replace(':', '_').replace('/', '_')}_{args.method}{'_sio' if args.synthetic else ''}_s{{seed}}"
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


# ----------------------------------------------------------------------------------------------
# Synthetic ID data (SPEC 1): images.npy/labels.npy, or <class index zero-padded>/<n>.png + meta.json.

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


def load_synthetic(path, dataset, classes, size, on_disk=False):
    """A synthetic ID set checked against the real one: finished, every class present, same classes.
    on_disk (folder datasets): the images stay on disk, read by the loader's workers as used: returns the list of
    files, or images.npy opened as a memory map, so memory does not grow with the number of images."""
    path, num_classes = Path(path), len(classes)
    check_set_meta(path, dataset, classes, 'sio')
    files = None
    if (path / 'images.npy').exists():
        if not (path / 'labels.npy').exists():
            fail(f'{path}/images.npy has no labels.npy beside it')
        images, labels = load_npy(path / 'images.npy', 'r' if on_disk else None), load_npy(path / 'labels.npy')
    elif path.is_dir():
        class_dirs = sorted(d for d in path.iterdir() if d.is_dir())
        if not class_dirs or not all(d.name.isdigit() for d in class_dirs):
            fail(f'{path} holds no synthetic set: expected images.npy+labels.npy or class folders named 000, 001, ...')
        entries = [(f, int(d.name)) for d in class_dirs for f in sorted(d.iterdir()) if f.is_file()]
        files = [(f, c) for f, c in entries if f.suffix.lower() in IMAGE_EXTENSIONS]
        if len(files) < len(entries):
            skipped = [f for f, _ in entries if f.suffix.lower() not in IMAGE_EXTENSIONS]
            print(f'note: {len(skipped)} file(s) in {path} are not images and are skipped (e.g. {skipped[0]})', file=sys.stderr)
        labels = np.array([c for _, c in files], dtype=np.int64)
        files = [str(f) for f, _ in files]
        # on disk: a stand-in of the right length for the checks below (the files are decoded by the loader)
        images = np.zeros((len(files), 1, 1, 3), np.uint8) if on_disk else read_images(files, size) if files else np.zeros((0, size, size, 3), np.uint8)
    else:
        fail(f'--synthetic {path} does not exist: run generate.py sio first or point at images.npy/labels.npy')
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape[1:3]:
        fail(f'{path}: synthetic images must be uint8 (N, H, W, 3) with H, W >= 1, got {images.dtype} {tuple(images.shape)}')
    if labels.ndim != 1 or len(labels) != len(images) or len(images) == 0:
        fail(f'{path}: need one label per image, got {len(labels)} labels for {len(images)} images')
    whole = labels.dtype.kind in 'iu' or (labels.dtype.kind == 'f' and np.isfinite(labels).all() and (labels == np.round(labels)).all())
    if not whole:
        fail(f'{path}: synthetic labels must be whole class indices, got {labels.dtype} labels with NaN or fractions')
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        fail(f'{path}: synthetic labels span {labels.min()}..{labels.max()} but the dataset has {num_classes} classes (0..{num_classes - 1})')
    missing = sorted(set(range(num_classes)) - set(np.unique(labels).tolist()))
    if missing:
        fail(f'{path}: synthetic set has {num_classes - len(missing)} classes but the dataset has {num_classes} '
             f'(no image for class {", ".join(map(str, missing[:5]))}{"..." if len(missing) > 5 else ""}): generate it for this --dataset')
    if on_disk:  # resized by the loader's crop, like the real images
        return (files if files is not None else images), labels
    return resize_images(images, size), labels  # e.g. 512x512 diffusion samples for 32x32 CIFAR


def resize_images(images, size):
    """uint8 (N, H, W, 3) -> uint8 (N, size, size, 3), antialiased bilinear, in chunks."""
    if images.shape[1:3] == (size, size):
        return images
    resized = [F.interpolate(torch.from_numpy(images[i:i + 256]).permute(0, 3, 1, 2).float(), size=(size, size),
                             mode='bilinear', antialias=True, align_corners=False) for i in range(0, len(images), 256)]
    return torch.cat(resized).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def image_files(path):
    """Every image file under a folder, searched recursively, as sorted path strings ([] when it is no folder)."""
    return sorted(str(f) for f in path.rglob('*') if f.suffix.lower() in IMAGE_EXTENSIONS) if path.is_dir() else []


def load_outlier_images(path, size):
    """Outlier images for OE: a .npy of uint8 (N, H, W, 3) or any folder of images (searched recursively)."""
    path = Path(path)
    if path.suffix == '.npy' and path.exists():
        images = np.load(path)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            fail(f'{path}: outlier images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}')
        return resize_images(images, size)
    files = image_files(path)
    if not files:
        fail(f'--oe-data {path}: no images found (pass a .npy of uint8 images or a folder of image files)')
    return read_images(files, size)


# ----------------------------------------------------------------------------------------------
# SIO batch composition: exactly int(B*alpha) real + B - int(B*alpha) synthetic per batch,
# ceil(N_real / B) batches per epoch, both index lists reshuffled independently every epoch.

def draw(n, count, generator):
    """count indices from consecutive fresh permutations of range(n)."""
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(math.ceil(count / n))])[:count]


def sio_batches(n_real, n_syn, batch_size, alpha, generator):
    """List of (real_idx, syn_idx) LongTensors for one epoch."""
    num_batches = math.ceil(n_real / batch_size)
    if n_syn == 0 or alpha >= 1:  # baseline: every real image once, last batch may be smaller
        perm = torch.randperm(n_real, generator=generator)
        return [(perm[i:i + batch_size], perm[:0]) for i in range(0, n_real, batch_size)]
    real_per_batch = int(batch_size * alpha)
    syn_per_batch = batch_size - real_per_batch
    # Faithful to SIO: only num_batches * real_per_batch real images are drawn per epoch (about 80%
    # at alpha 0.8); the rest wait for a later epoch's reshuffle.
    real = draw(n_real, num_batches * real_per_batch, generator)
    syn = draw(n_syn, num_batches * syn_per_batch, generator)
    return [(real[b * real_per_batch:(b + 1) * real_per_batch], syn[b * syn_per_batch:(b + 1) * syn_per_batch])
            for b in range(num_batches)]


# ----------------------------------------------------------------------------------------------
# Augmentation and normalisation on the training device, in batch (uint8 NCHW in, float out).

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


def normalize(x, mean, std, size):
    """uint8 images (or float ones on the same 0..255 scale, e.g. PixMix's) -> normalised float at size, channels_last."""
    x = x.float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    x = (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last)


class FolderImages(torch.utils.data.Dataset):
    """Real image files followed by synthetic ones (more files, or a memory-mapped images.npy), decoded and cropped
    in the workers to uint8 CHW: nothing is held in memory but the lists."""

    def __init__(self, files, labels, size, train, extra_images=None, extra_labels=None):
        if isinstance(extra_images, list):  # synthetic image files: read like the real ones
            files, labels, extra_images = list(files) + extra_images, np.concatenate([labels, extra_labels]), None
        self.files, self.labels = files, labels
        self.extra_images, self.extra_labels = extra_images, extra_labels  # images.npy as a memory map, or None
        import torchvision
        t = torchvision.transforms
        self.transform = (t.RandomResizedCrop(size) if train else
                          t.Compose([t.Resize(int(size * 256 / 224)), t.CenterCrop(size)]))

    def __len__(self):
        return len(self.files) + (0 if self.extra_images is None else len(self.extra_images))

    def __getstate__(self):  # workers started by spawn reopen the memory map rather than receive a copy of every image
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
        if i < len(self.files):
            image, label = Image.open(self.files[i]).convert('RGB'), self.labels[i]
        else:
            image, label = Image.fromarray(self.extra_images[i - len(self.files)]), self.extra_labels[i - len(self.files)]
        return torch.from_numpy(np.array(self.transform(image))).permute(2, 0, 1), int(label)


# ----------------------------------------------------------------------------------------------
# The objective: cross-entropy over the mixed batch, plus the plug-in method's term.

def method_loss(method, logits, labels, tau=0.04, oe_weight=0.5, mix_labels=None, lam=1.0):
    """logits holds len(labels) ID rows first, then any outlier rows (OE); returns the scalar loss.

    With SIO the ID rows are real and synthetic alike, so plain mean CE over the batch equals
    (B_r/B) * CE(real) + (B_s/B) * CE(synthetic): the weighting is done by the batch composition."""
    z_id, z_ood = logits[:len(labels)], logits[len(labels):]
    if method == 'logitnorm':  # LogitNorm (Wei et al. 2022): CE on logits normalised to length 1/tau
        z_id = z_id / (z_id.norm(dim=1, keepdim=True) + 1e-7) / tau
    loss = F.cross_entropy(z_id, labels)
    if mix_labels is not None:  # CutMix: the pasted box carries its own label, weighted by its area
        loss = lam * loss + (1 - lam) * F.cross_entropy(z_id, mix_labels)
    if len(z_ood):  # OE (Hendrycks et al. 2019): cross-entropy of outliers to the uniform distribution
        loss = loss + oe_weight * (z_ood.logsumexp(dim=1) - z_ood.mean(dim=1)).mean()
    return loss


def cutmix(x, labels):
    """CutMix (beta 1, prob 1): paste a random box from a shuffled copy of the batch; lam = kept area."""
    n, _, h, w = x.shape
    lam = float(np.random.beta(1.0, 1.0))
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = np.random.randint(h), np.random.randint(w)
    y1, y2, x1, x2 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h), np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    perm = torch.randperm(n, device=x.device)
    x = x.clone()
    x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    return x, labels[perm], 1 - (y2 - y1) * (x2 - x1) / (h * w)


# ----------------------------------------------------------------------------------------------
# PixMix (Hendrycks et al. 2022), as OpenOOD's preprocessor runs it (the SIO code's): start from the
# image or one augmentation of it, then mix in 0..k times (uniform) a fresh augmentation of the
# original or a mixing picture, adding or multiplying with random weights (a, b). Here per image,
# in batch, on the training device: every op and weight is drawn per image, nothing leaves the GPU.

def int_parameter(level, maxval):
    """AugMix's int_parameter: floor(level * maxval / 10), per image."""
    return torch.floor(level * maxval / 10)


def random_sign(level):
    return torch.where(torch.rand(len(level), device=level.device) > 0.5, -1.0, 1.0) * level


def affine(x, rows):
    """PIL's Image.transform(AFFINE) per image: rows (n, 2, 3) map output pixel (x, y, 1) to input; bilinear, black fill."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device) + 0.5, torch.arange(w, device=x.device) + 0.5, indexing='ij')
    points = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    source = (points @ rows.transpose(1, 2)).view(n, h, w, 2)  # in pixels
    size = torch.tensor([w, h], device=x.device)
    sampled = F.grid_sample(x.float(), source / size * 2 - 1, mode='bilinear', padding_mode='border', align_corners=False)
    inside = ((source >= 0) & (source < size)).all(-1)[:, None]  # PIL fills a pixel whose source lies off the image
    return torch.where(inside, sampled, 0).round().clamp(0, 255).byte()


def geometric(x, kind, amount):
    """rotate (degrees counter-clockwise about the centre, as PIL), shear_x/shear_y (factor), translate_x/translate_y (pixels)."""
    n, _, h, w = x.shape
    rows = torch.eye(2, 3, device=x.device).repeat(n, 1, 1)
    if kind == 'rotate':  # input = centre + R (output - centre)
        cos, sin = torch.cos(torch.deg2rad(amount)), torch.sin(torch.deg2rad(amount))
        rows[:, 0, 0], rows[:, 0, 1], rows[:, 0, 2] = cos, -sin, w / 2 - cos * w / 2 + sin * h / 2
        rows[:, 1, 0], rows[:, 1, 1], rows[:, 1, 2] = sin, cos, h / 2 - sin * w / 2 - cos * h / 2
    elif kind == 'shear_x':  # PIL's (1, level, 0, 0, 1, 0)
        rows[:, 0, 1] = amount
    elif kind == 'shear_y':  # (1, 0, 0, level, 1, 0)
        rows[:, 1, 0] = amount
    elif kind == 'translate_x':  # (1, 0, level, 0, 1, 0)
        rows[:, 0, 2] = amount
    else:  # translate_y: (1, 0, 0, 0, 1, level)
        rows[:, 1, 2] = amount
    return affine(x, rows)


def blend(degenerate, x, factor):
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate), cut to uint8."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x.float() - degenerate)).floor().clamp(0, 255).byte()


def grey(x):
    """PIL's convert('L'): ITU-R 601-2 luma, rounded, as float (n, 1, h, w)."""
    return ((x[:, 0:1].float() * 299 + x[:, 1:2].float() * 587 + x[:, 2:3].float() * 114 + 500) / 1000).floor()


def autocontrast(x):
    """PIL's ImageOps.autocontrast: each channel stretched to 0..255 (a flat channel is left as it is)."""
    low, high = x.amin((2, 3), keepdim=True).float(), x.amax((2, 3), keepdim=True).float()
    stretched = ((x.float() - low) * 255 / (high - low).clamp_min(1)).floor().clamp(0, 255).byte()
    return torch.where(high > low, stretched, x)


def equalize(x):
    """PIL's ImageOps.equalize per image and channel: a lookup table from the cumulative histogram."""
    n, c, h, w = x.shape
    values = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, values, torch.ones_like(values))
    step = (h * w - hist.gather(1, values.amax(1, keepdim=True))) // 255  # all pixels but those of the top value, in 255 steps
    lut = ((step // 2 + hist.cumsum(1) - hist) // step.clamp_min(1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))  # a flat channel is left as it is
    return lut.gather(1, values).byte().view(n, c, h, w)


def posterize(x, bits):
    """PIL's ImageOps.posterize: keep the top `bits` bits of every channel (bits per image)."""
    return x & ((255 << (8 - bits.long())) & 255).byte().view(-1, 1, 1, 1)


def solarize(x, threshold):
    """PIL's ImageOps.solarize: invert every value at or above threshold (per image)."""
    return torch.where(x.float() >= threshold.view(-1, 1, 1, 1), 255 - x, x)


def smooth(x):
    """PIL's ImageFilter.SMOOTH (3x3, centre 5, others 1, /13), border pixels unchanged: ImageEnhance.Sharpness's degenerate."""
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5
    out = x.float().clone()
    out[:, :, 1:-1, 1:-1] = F.conv2d(x.float(), (kernel / 13).expand(3, 1, 3, 3), groups=3).round()
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
    # the four that overlap ImageNet-C's corruptions: on in the SIO code (OpenOOD's all_ops: true), off in PixMix's CIFAR script
    'color': lambda x, level: blend(grey(x), x, level * 1.8 / 10 + 0.1),
    'contrast': lambda x, level: blend(grey(x).mean((1, 2, 3), keepdim=True).add(0.5).floor(), x, level * 1.8 / 10 + 0.1),
    'brightness': lambda x, level: blend(torch.zeros((), device=x.device), x, level * 1.8 / 10 + 0.1),
    'sharpness': lambda x, level: blend(smooth(x), x, level * 1.8 / 10 + 0.1),
}


def augment_op(x, severity, all_ops):
    """One AugMix operation per image, chosen uniformly: every op runs on the whole batch and each image keeps its own
    (no host sync; the ops are cheap next to the network)."""
    ops = list(PIXMIX_OPS.values())[:None if all_ops else 9]
    which = torch.randint(len(ops), (len(x), 1, 1, 1), device=x.device)
    level = torch.empty(len(x), device=x.device).uniform_(0.1, severity)
    out = x
    for i, op in enumerate(ops):
        out = torch.where(which == i, op(x, level), out)
    return out


def mixing_weights(n, beta, device):
    """PixMix's get_ab per image: (Beta(beta, 1), Beta(1, beta)) or (1 + Beta(1, beta), -Beta(1, beta)), even odds."""
    first = torch.rand(n, device=device) < 0.5
    beta_b1 = torch.distributions.Beta(torch.tensor(float(beta), device=device), torch.tensor(1.0, device=device))
    beta_1b = torch.distributions.Beta(torch.tensor(1.0, device=device), torch.tensor(float(beta), device=device))
    a = torch.where(first, beta_b1.sample((n,)), 1 + beta_1b.sample((n,)))
    b = torch.where(first, beta_1b.sample((n,)), -beta_1b.sample((n,)))
    return a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)


def pixmix(x, mixing_pics, k=4, beta=3.0, severity=3, all_ops=True, rounds=None):
    """x, mixing_pics: uint8 (n, 3, h, w) on one device -> float (n, 3, h, w) in [0, 255], ready for normalize().
    rounds: mixings per image (default: uniform in 0..k, as PixMix draws them)."""
    n, device = len(x), x.device
    coin = lambda: torch.rand(n, 1, 1, 1, device=device) < 0.5
    mixed = torch.where(coin(), augment_op(x, severity, all_ops), x).float() / 255
    rounds = torch.randint(0, k + 1, (n, 1, 1, 1), device=device) if rounds is None else torch.as_tensor(rounds, device=device).view(-1, 1, 1, 1)
    for r in range(int(k)):
        partner = torch.where(coin(), augment_op(x, severity, all_ops), mixing_pics).float() / 255
        a, b = mixing_weights(n, beta, device)
        added = (a * (mixed * 2 - 1) + b * (partner * 2 - 1) + 1) / 2
        multiplied = (mixed * 2) ** a * (partner * 2).clamp_min(1e-37) ** b / 2
        mixed = torch.where(rounds > r, torch.where(coin(), added, multiplied).clamp(0, 1), mixed)
    return mixed * 255


def load_mixing_set(path, size):
    """PixMix's mixing pictures: every image under a folder, shorter side resized to size and centre-cropped square
    (a training step then takes a random crop at the training size, as OpenOOD's Resize + RandomCrop)."""
    from PIL import Image
    path = Path(path)
    files = image_files(path)
    if not files:
        fail(f'--mixing-set {path}: no images found; pass a folder of images (e.g. PixMix\'s fractals_and_fvis)')
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            image = Image.open(f).convert('RGB')
        except OSError as e:
            fail(f'cannot read image {f} ({type(e).__name__}): replace or remove that file')
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))), Image.BILINEAR)
        left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
        out[i] = np.asarray(image.crop((left, top, left + size, top + size)))
    return out


def random_crops(images, count, size):
    """count random (size x size) crops of randomly chosen images (uint8 NCHW), on their device."""
    pick = images[torch.randint(len(images), (count,), device=images.device)]
    offset = pick.shape[-1] - size
    dy = torch.randint(0, offset + 1, (count, 1), device=images.device)
    dx = torch.randint(0, offset + 1, (count, 1), device=images.device)
    rows = (dy + torch.arange(size, device=images.device))[:, None, :, None]
    cols = (dx + torch.arange(size, device=images.device))[:, None, None, :]
    return pick[torch.arange(count, device=images.device)[:, None, None, None], torch.arange(3, device=images.device)[None, :, None, None], rows, cols]


# ----------------------------------------------------------------------------------------------

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


RUN_FLAGS = ('dataset', 'classes', 'openood_root', 'arch', 'image_size', 'crop', 'synthetic', 'alpha', 'method', 'tau', 'oe_data', 'oe_weight',
             'oe_batch_size', 'oe_augment', 'mixing_set', 'pixmix_k', 'pixmix_beta', 'aug_severity', 'pixmix_ops',
             'epochs', 'batch_size', 'lr', 'weight_decay', 'seed')  # what --resume must match


def check_resume(state, run, out):
    """--resume continues only the same run: every flag that changes the result, and the same data set, as in last.pt."""
    if 'run' not in state or 'log' not in state:
        fail(f'--resume: {out}/last.pt was written by an older synth-ood that did not record its settings: start again with a new --out')
    stored = state['run']
    changed = [f"{'--' + k.replace('_', '-') if k in RUN_FLAGS else k} {stored.get(k)!r} -> {v!r}" for k, v in run.items() if stored.get(k) != v]
    if changed:
        fail(f"--resume: {out}/last.pt was trained with other settings ({'; '.join(changed)}): resume with its flags, or pass a new --out")


@torch.no_grad()
def accuracy(model, images, labels, args, ds, device, rank=0, world=1):
    """Top-1 on this rank's share of (images, labels); summed across ranks under DDP."""
    model.eval()
    correct = torch.zeros(2, device=device)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else nullcontext()
    if isinstance(images, torch.Tensor):
        idx = torch.arange(rank, len(images), world)
        batches = ((images[idx[i:i + 512]], labels[idx[i:i + 512]]) for i in range(0, len(idx), 512))
    else:
        subset = torch.utils.data.Subset(FolderImages(images, labels, args.image_size, train=False), range(rank, len(images), world))
        batches = torch.utils.data.DataLoader(subset, batch_size=256, num_workers=args.workers)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device)
        with autocast:
            correct += torch.stack([(model(normalize(x, ds['mean'], ds['std'], args.image_size)).argmax(1) == y).sum(), torch.tensor(len(y), device=device)])
    if world > 1:
        dist.all_reduce(correct)
    model.train()
    return (correct[0] / correct[1]).item()


def main(argv=None):
    args = get_args(argv)
    # DDP is switched on by torchrun's environment variables alone
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
        out = args.out.replace('{seed}', str(seed))
        if len(args.seeds) > 1 and rank == 0:
            print(f'== seed {seed} -> {out}')
        train(argparse.Namespace(**dict(run_args, seed=seed, out=out)), ddp, rank, world, device)
    if ddp:
        dist.destroy_process_group()


def train(args, ddp, rank, world, device):
    """One run of args.seed into args.out."""
    master = rank == 0
    out = Path(args.out)
    if master:
        check_out(out)
        claim_run_folder(out, args.resume, args.overwrite, 'train_sio.py')
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # ---------------------------------------------------------------- data
    ds = load_dataset(args.dataset, args.data_root, args.openood_root, args.classes)
    num_classes = len(ds['classes'])
    args.image_size = args.image_size or (ds['image_size'] if args.dataset == 'digits' else ARCH_SIZE[args.arch])
    in_memory = not args.dataset.startswith('folder:')
    store_size = ds['image_size'] if in_memory else args.image_size  # in-memory sets stay native, resized on the device
    crop_size = args.image_size if args.crop == 'published' else None  # published: resize first, so the crop shifts +-pad px at the training size
    train_x, train_y = ds['train']
    syn_x, syn_y = load_synthetic(args.synthetic, args.dataset, ds['classes'], store_size, not in_memory) if args.synthetic else (None, None)
    n_real, n_syn = len(train_y), 0 if syn_y is None else len(syn_y)
    if in_memory:  # the whole set as a uint8 tensor on the training device: no loader, no workers
        def to_device(images):
            return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
        train_x, train_y = to_device(train_x), torch.from_numpy(train_y).to(device)
        if n_syn:
            syn_x, syn_y = to_device(syn_x), torch.from_numpy(syn_y).to(device)
        val_x, val_y = to_device(ds['val'][0]), torch.from_numpy(ds['val'][1]).to(device)
    else:
        folder_set = FolderImages(train_x, train_y, args.image_size, train=True, extra_images=syn_x, extra_labels=syn_y)
        val_x, val_y = ds['val']

    def take(real_idx, syn_idx):
        if not n_syn:
            return train_x[real_idx], train_y[real_idx]
        return torch.cat([train_x[real_idx], syn_x[syn_idx]]), torch.cat([train_y[real_idx], syn_y[syn_idx]])

    oe_x = None
    if args.method == 'oe':
        oe_x = torch.from_numpy(load_outlier_images(args.oe_data, store_size)).permute(0, 3, 1, 2).contiguous().to(device)
        args.oe_batch_size = args.oe_batch_size or 2 * args.batch_size
    mixing_set = None
    if args.method == 'pixmix':  # kept a little larger than the images, as OpenOOD's Resize(36) before RandomCrop(32) (256 for 224)
        mixed_size = args.image_size if crop_size or not in_memory else store_size
        mixing_set = torch.from_numpy(load_mixing_set(args.mixing_set, round(mixed_size * (256 / 224 if not in_memory else 36 / 32))))
        mixing_set = mixing_set.permute(0, 3, 1, 2).contiguous().to(device)
        if master:
            print(f'PixMix: {len(mixing_set):,} mixing pictures from {args.mixing_set}; k {args.pixmix_k}, beta {args.pixmix_beta}, '
                  f'severity {args.aug_severity}, {args.pixmix_ops} ops')
    batch_plan = sio_batches(n_real, n_syn, args.batch_size, args.alpha, torch.Generator().manual_seed(0))
    real_seen = sum(len(r) for r, _ in batch_plan)
    if master:
        if n_syn:
            r0, s0 = len(batch_plan[0][0]), len(batch_plan[0][1])
            print(f'SIO: {r0} real + {s0} synthetic per batch of {args.batch_size} (alpha {args.alpha}); {len(batch_plan)} batches/epoch '
                  f'use {real_seen:,} of {n_real:,} real images ({100 * real_seen / n_real:.1f}%) and draw {len(batch_plan) * s0:,} from {n_syn:,} synthetic')
        else:
            print(f'baseline: {n_real:,} real images, {len(batch_plan)} batches/epoch of {args.batch_size}')

    # ---------------------------------------------------------------- model and optimiser
    model = Net(args.arch, num_classes).to(device).to(memory_format=torch.channels_last)
    raw_model = model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=args.nesterov, weight_decay=args.weight_decay)
    total_steps = args.epochs * len(batch_plan)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: MIN_LR / args.lr + (1 - MIN_LR / args.lr) * 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    start_epoch, best_acc, log = 0, -1.0, []
    # flags that cannot change this run stay out, so a run saved before they existed still resumes
    unused = ({'mixing_set', 'pixmix_k', 'pixmix_beta', 'aug_severity', 'pixmix_ops'} if args.method != 'pixmix' else set()) | ({'classes'} if args.classes is None else set())
    run = {k: os.path.abspath(v) if k in ('openood_root', 'synthetic', 'oe_data', 'mixing_set') and v else v for k, v in vars(args).items()
           if k in RUN_FLAGS and k not in unused}
    run['synthetic set'] = dict(images=n_syn, meta=read_meta(Path(args.synthetic))) if n_syn else None
    if args.resume and not (out / 'last.pt').exists() and master:
        print(f'--resume: no {out}/last.pt yet, starting at epoch 1')
    if args.resume and (out / 'last.pt').exists():
        state = read_checkpoint(out / 'last.pt', '--resume:')
        if state.get('method') == 'oal' or 'optimizer' not in state:
            fail(f'--resume: {out}/last.pt is not a train_sio.py run (method {state.get("method")}): pass the --out of a train_sio.py run')
        check_resume(state, run, out)
        raw_model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        start_epoch, best_acc, log = state['epoch'], state['best_val_acc'], state['log']
        if master:  # the log rows travel inside last.pt, so a crash between the two writes loses no row
            write_log(log, out / 'log.jsonl')
            print(f'resumed from {out}/last.pt after epoch {start_epoch} (best val acc {100 * best_acc:.2f}%)')
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else nullcontext()

    def checkpoint(epoch, val_acc, full):
        ckpt = dict(model=raw_model.state_dict(), arch=args.arch, num_classes=num_classes, classes=ds['classes'],
                    dataset=args.dataset, image_size=args.image_size, mean=ds['mean'], std=ds['std'], epoch=epoch,
                    val_acc=val_acc, args=vars(args), method='sio' if n_syn else args.method)
        if full:  # bf16 autocast needs no GradScaler; the key is kept for the format
            ckpt.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=None, best_val_acc=best_acc, run=run, log=log,
                        rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                                 cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
        return ckpt

    # ---------------------------------------------------------------- training
    stop_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    if master:
        print(f"{'epoch':>5} {'loss':>8} {'train':>7} {'val':>7} {'img/s':>8} {'sec':>6}")
    for epoch in range(start_epoch, stop_epoch):
        # Every random draw of an epoch derives from (seed, epoch): a resumed run repeats it exactly.
        # The batch plan is the same on every rank; augmentation draws differ per rank.
        torch.manual_seed((args.seed * 1000 + epoch) * 1000 + rank)
        np.random.seed(((args.seed * 1000 + epoch) * 1000 + rank) % 2**32)
        epoch_generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        batch_plan = sio_batches(n_real, n_syn, args.batch_size, args.alpha, epoch_generator)
        if oe_x is not None:  # OpenOOD's outlier loader: reshuffled each epoch, and again whenever it runs out
            oe_order = draw(len(oe_x), len(batch_plan) * args.oe_batch_size, epoch_generator)
        if in_memory:  # each rank takes its share of every batch, with the same real/synthetic proportion
            batches = (take(r[rank::world].to(device), s[rank::world].to(device)) for r, s in batch_plan)
        else:
            sampler = [torch.cat([r[rank::world], s[rank::world] + n_real]).tolist() for r, s in batch_plan]
            batches = torch.utils.data.DataLoader(folder_set, batch_sampler=sampler, num_workers=args.workers, pin_memory=device.type == 'cuda',
                                                  persistent_workers=False)
        model.train()
        t0, seen, loss_sum, correct = time.time(), 0, torch.zeros((), device=device), torch.zeros((), device=device)
        bar = tqdm(batches, total=len(batch_plan), desc=f'epoch {epoch + 1}/{args.epochs}', disable=not master, leave=False, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
            order = torch.randperm(len(y), device=device)  # real and synthetic shuffled within the batch
            x, y = x[order], y[order]
            if in_memory:
                x = augment(x, args.pad, args.flip, crop_size)
            elif args.flip:
                x = augment(x, 0, True)
            mix_labels, lam = None, 1.0
            if mixing_set is not None:  # PixMix after the crop and flip, on real and synthetic images alike
                x = pixmix(x, random_crops(mixing_set, len(x), x.shape[-1]), args.pixmix_k, args.pixmix_beta, args.aug_severity,
                           args.pixmix_ops == 'all')
            if args.method == 'cutmix':
                x, mix_labels, lam = cutmix(x, y)
            if oe_x is not None and args.oe_augment:  # deviation (--oe-augment): augmented outliers drawn with replacement
                ood = oe_x[torch.randint(len(oe_x), (args.oe_batch_size // world,), device=device)]
                x = torch.cat([x, augment(ood, args.pad, args.flip, crop_size)])
            elif oe_x is not None:  # faithful (OpenOOD's OE trainer): test transform, the next outliers of this epoch's permutation, in the same forward pass
                x = torch.cat([x, augment(oe_x[oe_order[step * args.oe_batch_size:(step + 1) * args.oe_batch_size][rank::world].to(device)], 0, False, crop_size)])
            with autocast:
                logits = model(normalize(x, ds['mean'], ds['std'], args.image_size))
                loss = method_loss(args.method, logits.float(), y, args.tau, args.oe_weight, mix_labels, lam)
            if not torch.isfinite(loss):  # one sync per step, so the message can name the step
                bar.close()
                fail(f'loss is {loss.item()} at epoch {epoch + 1} step {step + 1}; '
                     + (f'{out}/last.pt holds epoch {epoch}, the last good one' if epoch else 'no epoch finished, so nothing was saved')
                     + ' (lower --lr, or check the data)')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits[:len(y)].argmax(1) == y).sum()
            seen += len(y)
            if step % 20 == 0:
                bar.set_postfix(loss=f'{loss.item():.3f}', img_s=f'{seen * world / (time.time() - t0):.0f}')
        stats = torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)])
        if ddp:
            dist.all_reduce(stats)
        seconds = time.time() - t0
        val_acc = accuracy(raw_model, val_x, val_y, args, ds, device, rank, world)
        if master:
            row = dict(epoch=epoch + 1, loss=(stats[0] / stats[2]).item(), train_acc=(stats[1] / stats[2]).item(), val_acc=val_acc,
                       lr=scheduler.get_last_lr()[0], real_seen=real_seen, synthetic_seen=sum(len(s) for _, s in batch_plan),
                       images_per_s=stats[2].item() / seconds, seconds=seconds)
            log.append(row)
            print(f"{epoch + 1:>5} {row['loss']:>8.4f} {100 * row['train_acc']:>6.2f}% {100 * val_acc:>6.2f}% {row['images_per_s']:>8.0f} {seconds:>6.1f}")
            if val_acc > best_acc:
                best_acc = val_acc
                save_atomic(checkpoint(epoch + 1, val_acc, full=False), out / 'best.pt')
            save_atomic(checkpoint(epoch + 1, val_acc, full=True), out / 'last.pt')
            write_log(log, out / 'log.jsonl')
    if master:
        print(f'best val acc {100 * best_acc:.2f}% -> {out}/best.pt')


if __name__ == '__main__':
    main()
