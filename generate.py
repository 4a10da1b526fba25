"""Generate the data both papers train on, with any diffusers text-to-image pipeline.

  fit  a small Stable-Diffusion-layout pipeline (CLIP tokenizer + text encoder, UNet2DConditionModel,
       AutoencoderKL, scheduler) trained on the ID training set, for when no pretrained one is at hand
       (the embedded digits benchmark, offline machines). Saved with save_pretrained.
  sio  class-balanced synthetic ID images from "a photo of a {class}" prompts (SIO, arXiv 2303.14531),
       written as zero-padded class folders + meta.json + images.npy/labels.npy.
  oal  latent-space outliers (OAL, arXiv 2406.16525): teacher features of the ID set -> k-NN
       low-density samples per class (knn_outliers.npy), then Stable Diffusion prompted with the class
       name while a token embedding is swapped for such a sample (which token: --inject) -> pooled final
       latents (diffusion_outliers.npy) and decoded images for inspection.
  fractals  random IFS fractal PNGs: an offline stand-in for PixMix's mixing set (train_sio.py --method pixmix).

    python generate.py fit --dataset digits --out pipelines/digits                      # ~2 min on a 2-core CPU
    python generate.py sio --pipeline pipelines/digits --dataset digits --per-class 300 --out samples/digits_sio
    python generate.py oal --pipeline pipelines/digits --teacher runs/digits_ce_s0 --dataset digits --out outliers/digits
    python generate.py fractals --out mixing/fractals --count 1000
    # the papers' setting on a GPU box (Stable Diffusion v1.4, PLMS 50 steps, guidance 7.5, seed 42)
    python generate.py sio --pipeline CompVis/stable-diffusion-v1-4 --dataset cifar10 --per-class 5000 --out samples/c10_sio
    python generate.py oal --pipeline CompVis/stable-diffusion-v1-4 --dataset cifar10 --out outliers/cifar10   # teacher: TEACHERS
    torchrun --nproc_per_node=8 generate.py sio ...     # indices split across ranks, each image written once

Every image depends only on (seed, index) and batches are fixed index ranges, so an interrupted run
started again recomputes only unfinished batches and ends with exactly the files of an uninterrupted run.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

SD_HUB_ID = 'CompVis/stable-diffusion-v1-4'  # the OAL paper's generator
OAL_PROMPT = 'A high-quality image of the {}'  # OAL / Dream-OOD prompt
FIT_TEMPLATES = ['a photo of a {}', OAL_PROMPT, '{}']  # fit trains on all so sio and oal prompts both work
TEACHERS = {  # the paper's teacher, a ViT-B/16 fine-tuned on the ID set at 224, as public transformers classifiers
    'cifar10': 'aaraki/vit-base-patch16-224-in21k-finetuned-cifar10',  # model card: 97.88% on its eval split, 95.07% verified on the test set
    'cifar100': 'jialicheng/vit-base-patch16-224-in21k-cifar100-13',  # model card: 91.96% on its eval split
}
# OAL's outlier_generate.py prompts CIFAR-100 with these names (CIFAR-100's class order) ...
OAL_CIFAR100_NAMES = (
    'apples,aquarium fish,baby,bear,beaver,bed,bee,beetle,bicycle,bottles,bowls,boy,bridge,bus,butterfly,camel,cans,castle,caterpillar,cattle,'
    'chair,chimpanzee,clock,cloud,cockroach,couch,crab,crocodile,cups,dinosaur,dolphin,elephant,flatfish,forest,fox,girl,hamster,house,kangaroo,'
    'computer keyboard,lamp,lawn-mower,leopard,lion,lizard,lobster,man,maple,motorcycle,mountain,mouse,mushrooms,oak,oranges,orchids,otter,palm,'
    'pears,pickup truck,pine,plain,plates,poppies,porcupine,possum,rabbit,raccoon,ray,road,rocket,roses,sea,seal,shark,shrew,skunk,skyscraper,'
    'snail,snake,spider,squirrel,streetcar,sunflowers,sweet peppers,table,tank,telephone,television,tiger,tractor,train,trout,tulips,turtle,'
    'wardrobe,whale,willow,wolf,woman,worm').split(',')
# ... and its text encoder overwrites the first token of the class index's label in this list, for every dataset
# (ldm/modules/encoders/modules.py): for CIFAR-10 these are other words than the prompt's, so nothing is replaced.
OAL_INJECT_LABELS = [{1: 'fish', 21: 'chimp', 39: 'keyboard', 41: 'mower', 58: 'truck', 83: 'peppers'}.get(i, name)
                     for i, name in enumerate(OAL_CIFAR100_NAMES)]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--dataset', default='digits', help='digits | cifar10 | cifar100 | folder:PATH')
    common.add_argument('--classes', default=None, help="folder datasets: these classes only: imagenet-10 or imagenet-dogs (the SIO code's subsets) or a file of class folder names")
    common.add_argument('--data-root', default='./data')
    common.add_argument('--out', required=True)
    common.add_argument('--seed', type=int, default=None, help='default 0 (fit, sio) / 42 (oal, the paper)')
    common.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    common.add_argument('--dtype', default='bf16', choices=['bf16', 'fp16', 'fp32'], help='pipeline precision on CUDA (CPU always fp32)')
    f = sub.add_parser('fit', parents=[common], help='train a small SD-layout pipeline on the ID set')
    f.add_argument('--steps', type=int, default=1000, help='UNet + text-encoder training steps')
    f.add_argument('--vae-steps', type=int, default=200)
    f.add_argument('--batch-size', type=int, default=192)
    f.add_argument('--lr', type=float, default=3e-3)
    f.add_argument('--unet-channels', default=None, help='widths of the UNet levels (default 16,16 for digits\' 8x8 latents: 93-99%% agreement '
                                                         'over 5 fit seeds, larger SIO gains on average than 16,32, 10%% less time; 16,32 for larger images)')
    f.add_argument('--vae-channels', type=int, default=16)
    f.add_argument('--text-dim', type=int, default=32)
    f.add_argument('--prompt-dropout', type=float, default=0.1, help='share of empty prompts, for classifier-free guidance')
    f.add_argument('--check-per-class', type=int, default=50, help='samples per class for the agreement check at the end')
    f.add_argument('--overwrite', action='store_true', help='replace a pipeline that generate.py fit made in --out (only when the new one is complete)')
    for name, help_text in (('sio', 'synthetic ID images for SIO'), ('oal', 'latent-space outliers for OAL')):
        s = sub.add_parser(name, parents=[common], help=help_text)
        s.add_argument('--pipeline', default=None, help=f'diffusers pipeline: local folder or hub id (default pipelines/<dataset> if it exists, else {SD_HUB_ID})')
        s.add_argument('--steps', type=int, default=None, help='denoising steps (default: 50 for oal, 25 for sio)')
        s.add_argument('--guidance', type=float, default=None, help='classifier-free guidance (default 7.5 for oal, 4 for sio)')
        s.add_argument('--batch-size', type=int, default=16, help='images per pipeline call (fixed index ranges)')
        s.add_argument('--scheduler', default=None, choices=['pipeline', 'pndm', 'ddim'], help="default: pndm (PLMS) for oal, the pipeline's own for sio")
        s.add_argument('--max-batches', type=int, default=None, help='leave after this many batches (time-limited jobs; run again to continue)')
        s.add_argument('--overwrite', action='store_true', help='start afresh over a set in --out made with other settings (removes only its files)')
        s.add_argument('--class-names', default=None, help="the words for each class in prompts: lines 'wnid name, other name' "
                                                            "(ImageNet's LOC_synset_mapping.txt) or one name per line in class order")
    s = sub.choices['sio']
    s.add_argument('--per-class', type=int, default=100)
    s.add_argument('--npy', action=argparse.BooleanOptionalAction, default=None,
                   help="also write images.npy/labels.npy (SIO's release format), streamed to disk image by image; "
                        'default: yes for digits/CIFAR, no for folder datasets (train_sio.py reads their PNGs from disk)')
    s.add_argument('--prompt', default='a photo of a {}', help='template over the class name')
    o = sub.choices['oal']
    o.add_argument('--teacher', default=None, help='transformers image classifier (hub id or folder), run dir or .pt of ours, or baseline '
                                                   '(= runs/<dataset>_ce_s0). Default: the ViT-B/16 of TEACHERS for cifar10/100 (the paper), else baseline')
    o.add_argument('--teacher-class-order', default='auto', choices=['auto', 'ignore'],
                   help="auto: match the teacher's label names to the dataset's classes; ignore: take its outputs in the dataset's order")
    o.add_argument('--teacher-min-acc', type=float, default=0.5, help="stop when the teacher's val top-1 is below this (it does not fit the data)")
    o.add_argument('--crop', default='published', choices=['published', 'native'],
                   help="teacher features of augmented images: published = resize to the teacher's size, then flip and pad-crop there; "
                        "native = pad-crop at the dataset's size, then upsample")
    o.add_argument('--inject', default='published', choices=['published', 'fixed'],
                   help="published: overwrite the first token of OAL's CIFAR-100 label for the class index (changes nothing in a CIFAR-10 "
                        "prompt); fixed: the tokens of the class name in the prompt")
    o.add_argument('--features-per-class', type=int, default=500)
    o.add_argument('--knn-select', default='faithful', choices=['faithful', 'fixed'], help='faithful = the published (mis)indexing (SPEC 3.3)')
    o.add_argument('--knn-k', type=int, default=300)
    o.add_argument('--knn-sigma', type=float, default=0.07)
    o.add_argument('--knn-draws', type=int, default=1500, help='Gaussian candidates per boundary point')
    o.add_argument('--boundary', type=int, default=50, help='boundary (lowest-density) points per class')
    o.add_argument('--keep', type=int, default=2, help='candidates kept per boundary point')
    o.add_argument('--repeats', type=int, default=None, help='k-NN repeats per class (default = number of classes: 10 / 100 as the paper)')
    o.add_argument('--anchor', default=None, choices=['pooled', 'token'], help='norm of the class anchor: pooled text-encoder output (CIFAR-10 in OAL) or input token embedding (CIFAR-100 in OAL)')
    o.add_argument('--iterations', type=int, default=100)
    o.add_argument('--samples-per-iteration', type=int, default=3)
    o.add_argument('--prompt', default=OAL_PROMPT)
    fr = sub.add_parser('fractals', help="PixMix's mixing pictures made offline: random IFS fractals as PNGs")
    fr.add_argument('--out', required=True)
    fr.add_argument('--count', type=int, default=1000)
    fr.add_argument('--size', type=int, default=64, help='side of each PNG in pixels')
    fr.add_argument('--seed', type=int, default=0)
    fr.add_argument('--overwrite', action='store_true', help='start afresh over a set in --out made with other settings (removes only its files)')
    args = p.parse_args(argv)
    if args.command == 'fractals':
        check_ranges(args, [('--count', 'an integer >= 1', lambda v: v >= 1), ('--size', 'an integer >= 8', lambda v: v >= 8),
                            ('--seed', 'an integer in [0, 2**31)', lambda v: 0 <= v < 2 ** 31)])
        return args
    if args.seed is None:
        args.seed = 42 if args.command == 'oal' else 0
    if args.command in ('sio', 'oal'):
        if args.pipeline is None:
            local = Path('pipelines') / args.dataset.replace(':', '_').replace('/', '_')
            args.pipeline = str(local) if local.is_dir() else SD_HUB_ID
        args.steps = args.steps if args.steps is not None else 50 if args.command == 'oal' else 25
        args.guidance = args.guidance if args.guidance is not None else (7.5 if args.command == 'oal' else 4.0)
        args.scheduler = args.scheduler or ('pndm' if args.command == 'oal' else 'pipeline')
        if '{}' not in args.prompt:
            fail(f'--prompt must contain {{}} where the class name goes, got {args.prompt!r}')
    positive = ('an integer >= 1', lambda v: v >= 1)
    rules = [('--seed', 'an integer in [0, 2**31)', lambda v: 0 <= v < 2 ** 31), ('--batch-size', *positive)]
    if args.command == 'fit':
        rules += [('--steps', *positive), ('--vae-steps', *positive), ('--lr', 'a number > 0', lambda v: 0 < v < math.inf),
                  ('--vae-channels', 'a multiple of 8 (GroupNorm with 8 groups)', lambda v: v >= 8 and v % 8 == 0),
                  ('--text-dim', 'an even integer >= 2 (two attention heads)', lambda v: v >= 2 and v % 2 == 0),
                  ('--prompt-dropout', 'in [0, 1)', lambda v: 0 <= v < 1), ('--check-per-class', *positive)]
    else:
        rules += [('--steps', 'an integer in [1, 1000] (denoising steps)', lambda v: 1 <= v <= 1000),
                  ('--guidance', 'a number >= 0 (classifier-free guidance; 1 = none)', lambda v: 0 <= v < math.inf),
                  ('--max-batches', *positive)]
    if args.command == 'sio':
        rules += [('--per-class', *positive)]
    if args.command == 'oal':
        rules += [('--knn-k', *positive), ('--knn-sigma', 'a number > 0', lambda v: 0 < v < math.inf), ('--knn-draws', *positive),
                  ('--boundary', *positive), ('--keep', f'an integer in [1, --knn-draws ({args.knn_draws})]', lambda v: 1 <= v <= args.knn_draws),
                  ('--features-per-class', f'an integer > --knn-k ({args.knn_k}) and >= --boundary ({args.boundary})',
                   lambda v: v > args.knn_k and v >= args.boundary),
                  ('--repeats', *positive), ('--iterations', *positive), ('--samples-per-iteration', *positive),
                  ('--teacher-min-acc', 'in [0, 1]', lambda v: 0 <= v <= 1)]
    check_ranges(args, rules)
    if args.command == 'fit':
        args.unet_channels = args.unet_channels or ('16,16' if args.dataset == 'digits' else '16,32')
        channels = args.unet_channels.split(',')
        if not all(c.strip().isdigit() and int(c) >= 8 and int(c) % 8 == 0 for c in channels):
            fail(f'--unet-channels must be a comma list of multiples of 8 (GroupNorm with 8 groups), e.g. 16,32; got {args.unet_channels!r}')
    if args.classes and not args.dataset.startswith('folder:'):
        fail(f'--classes picks class folders of a folder:PATH dataset; --dataset {args.dataset} has fixed classes: drop --classes')
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

def normalize(x, mean, std, size):
    """uint8 images (or float ones on the same 0..255 scale, e.g. PixMix's) -> normalised float at size, channels_last."""
    x = x.float().div_(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    x = (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last)


def resize_uint8(images, size):
    """float images in [0, 1], (N, H, W, 3) as pipelines return them -> uint8 (N, size, size, 3), antialiased."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 255
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def save_png_atomic(image, path):
    from PIL import Image
    write_atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format='PNG'))


def save_npy_atomic(array, path):
    def write(tmp):
        with open(tmp, 'wb') as f:  # a file object: np.save would add .npy to the temporary name
            np.save(f, array)
    write_atomic(path, write)


def write_json(obj, path):
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def write_atomic(path, write):
    """write(tmp) then rename over path: a crash or a full disk never leaves half a file under the final name."""
    tmp = temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        fail(f'could not write {path} ({e}); the previous {Path(path).name}, if any, is intact: free some space or pass another --out')


SET_FILES = {'fractals': ('settings.json',), 'sio': ('settings.json', 'meta.json', 'images.npy', 'labels.npy'),
             'oal': ('settings.json', 'meta.json', 'knn_outliers.npy', 'knn_meta.json', 'diffusion_outliers.npy')}


def set_file(entry, command):
    """Whether entry is something generate.py sio/oal writes in its --out: its files, class folders of numbered
    PNGs (sio) or images/ and latents/ (oal), numbered PNGs (fractals), and their temporary names."""
    if command == 'fractals':
        return entry.is_file() and (entry.name in SET_FILES[command] or entry.name.split('.')[0].isdigit())
    folder = {'sio': lambda e: e.name.isdigit() and len(e.name) >= 3, 'oal': lambda e: e.name in ('images', 'latents')}[command]
    if entry.is_dir():  # files inside are numbered: 0.png, 0003_1_zero.png, 0003.npy (and their .PID.tmp)
        return folder(entry) and all(f.is_file() and f.name.split('.')[0].split('_')[0].isdigit() for f in entry.iterdir())
    return entry.name in SET_FILES[command] or is_temporary(entry, SET_FILES[command])


def claim_set(out, settings, overwrite, rank, world):
    """generate.py sio/oal's --out under claim_out's rule: the same settings continue an interrupted set; a folder
    that produced nothing yet takes new settings; other settings need --overwrite, which removes only this
    script's files; a folder without this script's settings.json is someone else's."""
    command, path = settings['command'], out / 'settings.json'
    if rank == 0:
        lock_folder(out / '.lock')
        try:
            old = json.loads(path.read_text()) if path.exists() else None
        except ValueError:
            old = 'unreadable'
        mine = (lambda e: set_file(e, command)) if path.exists() else (lambda e: False)
        produced = [e for e in out.iterdir() if mine(e) and e.name != 'settings.json' and not is_temporary(e, SET_FILES[command])
                    and (e.is_file() or any(e.iterdir()))]
        changed = (', '.join(f'{k} {old.get(k)!r} -> {v!r}' for k, v in settings.items() if old.get(k) != v)
                   if isinstance(old, dict) else f'settings.json {old}')
        held = f'a set made with other settings ({changed})' if old is not None and old != settings and produced and not overwrite else None
        claim_out(out, mine, held, 'pass --overwrite to start afresh, or another --out')
        for entry in [e for e in out.iterdir() if e.name != '.lock' and mine(e)]:
            if overwrite or old != settings:  # start afresh, or replace the leftovers of a run that produced nothing
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                continue
            for stale in ([entry] if entry.name.endswith('.tmp') else entry.glob('*.tmp') if entry.is_dir() else []):
                stale.unlink()  # a killed run's temporary files (this process holds the lock)
        write_json(settings, path)
    if world > 1:
        dist.barrier()  # every rank starts after rank 0 has claimed the folder


def readable_image(path):
    """A finished image: present and decodable (a file cut short or damaged outside this script is made again)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, SyntaxError):  # missing, truncated, not an image
        return False


def prompt_name(class_name):
    """Class names as words in a prompt: torchvision's 'aquarium_fish' -> 'aquarium fish'."""
    return class_name.replace('_', ' ')


WORDNET_ID = re.compile(r'n\d{8}')
MAPPING_FILES = ('LOC_synset_mapping.txt', 'synset_words.txt')  # ImageNet's 'wnid name, other name' lists, found in a folder dataset's root


def class_prompt_names(classes, dataset, names_file=None):
    """The words for each class in a prompt: --class-names FILE (lines 'wnid name, other name', whose first
    name is used, or one name per line in class order), else a mapping file in the folder dataset's root,
    else the class names themselves. Folder names that are WordNet ids are refused without a mapping:
    'a photo of a n02085620' means nothing to a text encoder."""
    root = Path(dataset[len('folder:'):]) if dataset.startswith('folder:') else None
    if names_file is None and root is not None:
        names_file = next((root / f for f in MAPPING_FILES if (root / f).exists()), None)
    if names_file is None:
        wnids = [c for c in classes if WORDNET_ID.fullmatch(c)]
        if wnids:
            fail(f'class folders such as {wnids[0]} are WordNet ids: pass --class-names FILE (ImageNet\'s LOC_synset_mapping.txt, '
                 f'lines "n01440764 tench, Tinca tinca", or one name per line in class order)')
        return [prompt_name(c) for c in classes]
    if not Path(names_file).is_file():
        fail(f'--class-names {names_file} does not exist: pass a text file with one class per line')
    lines = [line.strip() for line in Path(names_file).read_text().splitlines() if line.strip()]
    if lines and all(WORDNET_ID.fullmatch(line.split()[0]) and len(line.split(None, 1)) == 2 for line in lines):
        mapping = {line.split(None, 1)[0]: line.split(None, 1)[1].split(',')[0].strip() for line in lines}
        missing = [c for c in classes if c not in mapping]
        if missing:
            fail(f'{names_file} names no class {missing[0]} ({len(missing)} of {len(classes)} missing): pass the mapping for these folders')
        return [mapping[c] for c in classes]
    if len(lines) != len(classes):
        fail(f'{names_file} has {len(lines)} names for {len(classes)} classes: give one name per line in class order '
             f'(sorted folder names), or "wnid name" lines')
    return [prompt_name(line) for line in lines]


def setup_distributed(device_name):
    """torchrun -> (rank, world, device); one process without it."""
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        use_cuda = device_name.startswith('cuda')
        dist.init_process_group('nccl' if use_cuda else 'gloo')
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else 'cpu')
        if use_cuda:
            torch.cuda.set_device(device)
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device(device_name)


# ----------------------------------------------------------------------------------------------
# Pipelines: a real from_pretrained (hub id or folder), with one clear line when it cannot load.

def load_pipeline(name, device, dtype_name, scheduler='pipeline'):
    import diffusers
    from diffusers import DDIMScheduler, DiffusionPipeline, PNDMScheduler
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[dtype_name] if device.type == 'cuda' else torch.float32
    local = Path(name).is_dir()
    if not local and (Path(name).exists() or name.startswith(('.', '/'))):
        fail(f'--pipeline {name} is not a folder: pass a diffusers pipeline folder or a hub id')
    options = dict(torch_dtype=dtype) if dtype != torch.float32 else {}
    if not local or (Path(name) / 'safety_checker').exists():  # generation for research: no NSFW filter on outliers
        options.update(safety_checker=None, requires_safety_checker=False)
    if not local:
        offline_if_unreachable()
        diffusers.utils.logging.set_verbosity_error()  # offline, the cache lookup would print its own lines before our one
    try:
        pipe = DiffusionPipeline.from_pretrained(name, **options)
    except Exception as e:
        where = 'a local pipeline folder' if local else f'hub id {name!r} (no network, or not a diffusers pipeline)'
        fail(f'cannot load {where}: {type(e).__name__}; pass a local folder with --pipeline DIR, '
             f'or make one with: python generate.py fit --dataset DATASET --out DIR')
    for part in ('tokenizer', 'text_encoder', 'unet', 'vae', 'scheduler'):
        if getattr(pipe, part, None) is None:
            fail(f'{name} is not a text-to-image latent diffusion pipeline (no {part}); use a Stable-Diffusion-layout pipeline')
    if scheduler == 'pndm':  # PLMS as in the papers' Stable Diffusion scripts
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    elif scheduler == 'ddim':
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ----------------------------------------------------------------------------------------------
# fit: a Stable-Diffusion-layout pipeline small enough to train on a CPU in minutes. What makes it
# cheap: the native resolution (8x8 for digits), a one-level VAE (no downsampling, latent = image
# size), two UNet levels of 16/16 channels (digits; 16/32 for larger images) without attention, text conditioning added
# to the time embedding (addition_embed_type="text") plus cross-attention only in the middle block (4x4 for digits).

def bytes_to_unicode():
    """CLIP/GPT-2 byte-level BPE alphabet: every byte as a printable character."""
    printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def build_tokenizer(words, folder, max_length):
    """A CLIP tokenizer whose vocabulary is every byte plus whole-word tokens for `words`."""
    from transformers import CLIPTokenizer
    alphabet = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + '</w>': len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = []
    for word in words:  # merges that build each word left to right, so it becomes one token
        pieces = list(word[:-1]) + [word[-1] + '</w>']
        merged = pieces[0]
        for piece in pieces[1:]:
            if f'{merged} {piece}' not in merges:
                merges.append(f'{merged} {piece}')
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab['<|startoftext|>'] = len(vocab)
    vocab['<|endoftext|>'] = len(vocab)  # highest id: CLIP pools the text at argmax(input_ids)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'vocab.json').write_text(json.dumps(vocab))
    (folder / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


FIT_ENTRIES = ('fit.json', 'model_index.json', 'scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae')  # what fit writes in its --out


def fit(args):
    """Claim --out, build the pipeline in a fresh uniquely named sibling, swap it in only when complete."""
    out, t_start = Path(args.out).resolve(), time.time()
    if out.exists() and not out.is_dir():
        fail(f'--out {args.out} is a file, not a folder: pass a folder')
    check_out(out.parent)
    lock_folder(out.parent / f'.{out.name}.lock')
    made_by_fit = (out / 'fit.json').exists()
    claim_out(out, lambda e: made_by_fit and e.name in FIT_ENTRIES, 'a pipeline made by generate.py fit' if made_by_fit and not args.overwrite else None,
              'pass --overwrite to replace it once the new one is complete, or another --out')
    ds = load_dataset(args.dataset, args.data_root, classes=args.classes)
    if args.dataset.startswith('folder:'):
        fail('fit keeps the training set in memory and suits small images (digits, CIFAR); for image folders use a pretrained pipeline')
    work = Path(tempfile.mkdtemp(prefix=f'.{out.name}.building-', dir=out.parent))
    try:
        agreement, seconds = train_pipeline(args, ds, work, t_start)
    except BaseException as e:  # an error or Ctrl-C: only the folder this call created goes (a kill leaves it, hidden, to delete by hand)
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError):  # e.g. a full disk in save_pretrained
            fail(f'could not write the pipeline under {out.parent} ({e}); nothing in --out was touched: free some space or pass another --out')
        raise
    if out.exists():  # empty, or the pipeline fit made (claim_out checked): moved aside, the new one in, then the old one removed
        old = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old-', dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(work, out)
        shutil.rmtree(old)
    else:
        os.replace(work, out)
    print(f'fit: {seconds:.0f}s; class agreement of generated images {100 * agreement:.1f}% '
          f'(real-digit classifier, {args.check_per_class}/class); saved {out}')


def train_pipeline(args, ds, work, t_start):
    """Steps 1-4 of fit into the folder work; returns (class agreement, seconds)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from sklearn.linear_model import LogisticRegression
    from transformers import CLIPTextConfig, CLIPTextModel
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    size, classes = ds['image_size'], ds['classes']
    words = sorted({w for t in FIT_TEMPLATES for w in t.replace('-', ' ').replace('{}', ' ').lower().split()} |
                   {w for c in classes for w in prompt_name(c).lower().split()})
    tokenizer = build_tokenizer(words, work / 'tokenizer_build', max_length=16)
    vocab_size = len(tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=args.text_dim, intermediate_size=2 * args.text_dim,
                                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)).to(device)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',), up_block_types=('UpDecoderBlock2D',),
                        block_out_channels=(args.vae_channels,), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=size, mid_block_add_attention=False).to(device)
    channels = tuple(int(c) for c in args.unet_channels.split(','))
    unet = UNet2DConditionModel(sample_size=size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
                                down_block_types=('DownBlock2D',) * len(channels), up_block_types=('UpBlock2D',) * len(channels),
                                mid_block_type='UNetMidBlock2DCrossAttn', cross_attention_dim=args.text_dim, attention_head_dim=8,
                                norm_num_groups=8, addition_embed_type='text', addition_embed_type_num_heads=2).to(device)
    images = torch.from_numpy(ds['train'][0]).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
    labels = torch.from_numpy(ds['train'][1]).to(device)

    # 1. the VAE: reconstruction + the tiny KL weight of Stable Diffusion's VAE
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    for step in tqdm(range(args.vae_steps), desc='fit vae', leave=False):
        x = images[torch.randint(len(images), (min(128, args.batch_size),), device=device)]
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 512]).latent_dist.mean for i in range(0, len(images), 512)])
    vae.register_to_config(scaling_factor=1 / latents.std().item())  # unit-variance latents, as SD's 0.18215
    latents = latents * vae.config.scaling_factor
    print(f'vae: reconstruction mse {loss.item():.4f}, latent scaling {vae.config.scaling_factor:.3f} ({time.time() - t_start:.0f}s)')

    # 2. UNet + text encoder: epsilon prediction on SD's noise schedule, prompts with dropout for CFG
    noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012)
    prompt_ids = torch.stack([torch.stack([tokenizer(t.format(prompt_name(c)), padding='max_length', max_length=16, truncation=True,
                                                     return_tensors='pt').input_ids[0] for t in FIT_TEMPLATES]) for c in classes]).to(device)
    empty_ids = tokenizer('', padding='max_length', max_length=16, return_tensors='pt').input_ids[0].to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    warmup = min(100, args.steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    bar = tqdm(range(args.steps), desc='fit unet', leave=False)
    for step in bar:
        idx = torch.randint(len(latents), (args.batch_size,), device=device)
        ids = prompt_ids[labels[idx], torch.randint(len(FIT_TEMPLATES), (args.batch_size,), device=device)]
        ids = torch.where((torch.rand(args.batch_size, 1, device=device) < args.prompt_dropout), empty_ids, ids)
        noise = torch.randn_like(latents[idx])
        t = torch.randint(0, 1000, (args.batch_size,), device=device)
        pred = unet(noise_schedule.add_noise(latents[idx], noise, t), t, text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f'{loss.item():.4f}')
    print(f'unet: {args.steps} steps, last loss {loss.item():.4f} ({time.time() - t_start:.0f}s)')

    # 3. save as a Stable Diffusion pipeline; DDIM with SD's betas (clip_sample off: latents are not in [-1, 1])
    sampler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', clip_sample=False,
                            set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=sampler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(work)
    shutil.rmtree(work / 'tokenizer_build')

    # 4. the check: a classifier fitted on the real digits labels the generated ones
    pipe.set_progress_bar_config(disable=True)
    grey = lambda x: x.reshape(len(x), -1, 3).mean(-1) / 255
    clf = LogisticRegression(max_iter=3000).fit(grey(ds['train'][0]), ds['train'][1])
    agree = []
    for c, name in enumerate(classes):
        with torch.no_grad():
            out_images = pipe(['a photo of a {}'.format(prompt_name(name))] * args.check_per_class, num_inference_steps=25, guidance_scale=4.0,
                              output_type='np', generator=torch.Generator(device).manual_seed(args.seed + c)).images
        agree.append(clf.predict(grey(resize_uint8(out_images, size))) == c)
    agreement = float(np.concatenate(agree).mean())
    seconds = time.time() - t_start
    write_json(dict(dataset=args.dataset, classes=classes, agreement=agreement, seconds=seconds, args=vars(args),
                    check='logistic regression on real train pixels labels 25-step DDIM samples at guidance 4'), work / 'fit.json')
    return agreement, seconds


# ----------------------------------------------------------------------------------------------
# sio: image i (class i // per_class, number i % per_class) from generator seed (seed, i);
# batch b = indices [b*B, (b+1)*B), so a resumed run recomputes whole batches bit for bit.

def generate_sio(args):
    rank, world, device = setup_distributed(args.device)
    ds = load_dataset(args.dataset, args.data_root, classes=args.classes)
    classes, size = ds['classes'], ds['image_size']
    out = Path(args.out)
    total = len(classes) * args.per_class
    path_of = lambda i: out / f'{i // args.per_class:03d}' / f'{i % args.per_class}.png'
    if rank == 0:
        check_out(out)
    names = class_prompt_names(classes, args.dataset, args.class_names)
    settings = dict(command='sio', dataset=args.dataset, generator=args.pipeline, prompt_template=args.prompt, class_names=names, seed=args.seed,
                    steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, per_class=args.per_class, batch_size=args.batch_size)
    claim_set(out, settings, args.overwrite, rank, world)
    pipe = load_pipeline(args.pipeline, device, args.dtype, args.scheduler)
    if rank == 0:
        for c in range(len(classes)):
            (out / f'{c:03d}').mkdir(exist_ok=True)
    if world > 1:
        dist.barrier()
    batches = [range(s, min(s + args.batch_size, total)) for s in range(0, total, args.batch_size)]
    finished = [all(readable_image(path_of(i)) for i in b) for b in batches]
    todo = [b for n, b in enumerate(batches) if n % world == rank and not finished[n]]
    if args.max_batches is not None:
        todo = todo[:args.max_batches]
    if rank == 0:
        print(f'sio: {len(classes)} classes x {args.per_class} = {total} images, {sum(len(b) for b, done in zip(batches, finished) if done)} '
              f'already done; prompt "{args.prompt}", {args.steps} steps, guidance {args.guidance}, {world} process(es)')
    t0, made, written = time.time(), 0, 0
    bar = tqdm(todo, desc=f'sio rank {rank}', disable=rank != 0)
    for batch in bar:
        prompts = [args.prompt.format(names[i // args.per_class]) for i in batch]
        generators = [torch.Generator(device).manual_seed(args.seed * 1_000_003 + i) for i in batch]
        with torch.no_grad():
            images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generators, output_type='np').images
        for i, image in zip(batch, resize_uint8(images, size)):
            if not readable_image(path_of(i)):  # a damaged leftover is made again
                save_png_atomic(image, path_of(i))
                written += 1
        made += len(batch)
        bar.set_postfix(img_s=f'{made * world / (time.time() - t0):.2f}')
    if world > 1:
        print(f'sio rank {rank}: wrote {written} files')
        dist.barrier()
    if rank == 0:
        done = all(path_of(i).exists() for i in range(total))
        if done and (args.npy if args.npy is not None else not args.dataset.startswith('folder:')) \
                and not ((out / 'images.npy').exists() and (out / 'labels.npy').exists()):
            # the SIO-release pair, read back from the PNGs so both formats hold the same bytes, one image at a time
            from PIL import Image

            def write_images(tmp):
                images = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.uint8, shape=(total, size, size, 3))
                for i in range(total):
                    images[i] = np.asarray(Image.open(path_of(i)).convert('RGB'))
                images.flush()
            write_atomic(out / 'images.npy', write_images)
            save_npy_atomic(np.repeat(np.arange(len(classes)), args.per_class), out / 'labels.npy')
        write_json(dict(dataset=args.dataset, classes=classes, prompts=[args.prompt.format(n) for n in names], generator=args.pipeline,
                        prompt_template=args.prompt, seed=args.seed,
                        steps=args.steps, guidance=args.guidance, scheduler=type(pipe.scheduler).__name__, per_class=args.per_class,
                        counts=[sum(path_of(c * args.per_class + n).exists() for n in range(args.per_class)) for c in range(len(classes))],
                        image_size=size, complete=done), out / 'meta.json')
        seconds = time.time() - t0
        print(f'sio: {made * world} images in {seconds:.1f}s ({made * world / max(seconds, 1e-9):.2f} images/s); '
              + ('complete' if done else 'incomplete: run the same command again to continue') + f' -> {out}')
    if world > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# oal, steps 1-2: the teacher and its features of the ID training set. Same loader as train_oal.py.

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


@torch.no_grad()
def teacher_features(forward, images, labels, num_classes, per_class, pad, flip, size, device, seed):
    """(C, n, d) teacher features of up to per_class training images per class, with training augmentation."""
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else nullcontext()
    g = np.random.RandomState(seed)
    feats = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[g.permutation(len(idx))[:per_class]]
        out = []
        for i in range(0, len(idx), 256):
            x = augment(torch.from_numpy(images[idx[i:i + 256]]).permute(0, 3, 1, 2).to(device), pad, flip, size)
            with autocast:
                out.append(forward(x)[1].float())
        feats.append(torch.cat(out))
    n = min(len(f) for f in feats)  # equal n per class for the (C, n, d) array
    return torch.stack([f[:n] for f in feats])


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


# ----------------------------------------------------------------------------------------------
# oal, step 3: k-NN low-density sampling in the teacher's feature space (NPOS / Dream-OOD).

def kth_distance(queries, bank, k, chunk=8192):
    """Squared L2 distance from each query to its k-th nearest point of bank (a point counts as its own neighbour).
    The same value either way: kthvalue is 2-3x faster when k is a large share of the bank (digits: 105 of 106), topk when small."""
    kth = (lambda d: d.kthvalue(k, dim=1).values) if 4 * k > len(bank) else (lambda d: d.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat([kth(torch.cdist(queries[i:i + chunk], bank).pow(2)) for i in range(0, len(queries), chunk)])


def knn_outliers(class_feats, k=300, select=50, sigma=0.07, draws=1500, keep=2, repeats=10, mode='faithful', generator=None):
    """(select * keep * repeats, d) unit-norm outlier embeddings around one class's low-density boundary."""
    X = F.normalize(class_feats.float(), dim=1)
    k = min(k, len(X) - 1)
    boundary = X[kth_distance(X, X, k).topk(select).indices]  # the `select` most isolated points, most isolated first
    out = []
    for _ in range(repeats):
        # As in Dream-OOD/OAL: one set of `draws` Gaussian vectors per repeat, shared by every boundary point.
        eps = torch.randn(draws, X.shape[1], generator=generator).to(X.device)
        candidates = F.normalize(boundary.repeat_interleave(draws, dim=0) + sigma * eps.repeat(select, 1), dim=1)  # index b*draws + j
        score = kth_distance(candidates, X, k)
        if mode == 'faithful':
            # Published behaviour: the boundary-major scores are viewed as (draws, select) and the top-`keep`
            # rows r of each column b give candidate b*draws + r[:, b] - not the true top scorers of point b.
            rows = score.view(draws, select).topk(keep, dim=0).indices  # (keep, select)
            picked = (torch.arange(select, device=X.device) * draws)[None, :] + rows
            picked = picked.T.reshape(-1)
        else:  # fixed: the `keep` highest-scoring candidates of each boundary point
            rows = score.view(select, draws).topk(keep, dim=1).indices  # (select, keep)
            picked = ((torch.arange(select, device=X.device) * draws)[:, None] + rows).reshape(-1)
        out.append(candidates[picked])
    return torch.cat(out)


def class_anchor_norms(pipe, names, kind):
    """Norm of each class's anchor in the generator's text encoder: 'pooled' = mean-pooled encoder output
    of the class name (OAL on CIFAR-10, about 27 for SD v1.4), 'token' = mean input token embedding of
    its tokens (OAL on CIFAR-100, about 0.39)."""
    norms = []
    table = pipe.text_encoder.get_input_embeddings().weight
    for name in names:
        with torch.no_grad():
            if kind == 'token':
                ids = pipe.tokenizer(name, add_special_tokens=False).input_ids
                norms.append(table[ids].float().mean(0).norm().item())
            else:
                ids = pipe.tokenizer(name, padding='max_length', max_length=pipe.tokenizer.model_max_length, truncation=True,
                                     return_tensors='pt').input_ids.to(table.device)
                norms.append(pipe.text_encoder(ids)[0].float().mean(1).norm().item())
    return norms


@contextmanager
def injected(text_encoder, token_ids, vector):
    """Temporarily overwrite the input-embedding rows of token_ids with vector; restored on exit."""
    table = text_encoder.get_input_embeddings().weight
    saved = table.data[token_ids].clone()
    table.data[token_ids] = vector.to(table.dtype).to(table.device)
    try:
        yield
    finally:
        table.data[token_ids] = saved


def injected_tokens(tokenizer, names, c, mode):
    """Token ids whose input embeddings carry class c's outlier vector. published (the authors' code): the first
    token of OAL_INJECT_LABELS[c], whatever the dataset, so in a CIFAR-10 prompt nothing changes and their CIFAR-10
    outliers are plain class-prompt samples. fixed: every token of the class name that is in the prompt."""
    if mode == 'published':
        return tokenizer(OAL_INJECT_LABELS[c], add_special_tokens=False).input_ids[:1]
    return tokenizer(names[c], add_special_tokens=False).input_ids


def projection(d_from, d_to, seed):
    """A fixed, seeded random map with orthonormal rows or columns (d_from, d_to): keeps norms when d_from <= d_to."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(d_from, d_to), min(d_from, d_to), generator=g))
    return q if d_from >= d_to else q.T


def generate_oal(args):
    rank, world, device = setup_distributed(args.device)
    out = Path(args.out)
    if rank == 0:
        check_out(out)
    ds = load_dataset(args.dataset, args.data_root, classes=args.classes)
    classes = ds['classes']
    names = class_prompt_names(classes, args.dataset, args.class_names)
    if args.dataset == 'cifar100' and args.class_names is None and args.inject == 'published':
        names = OAL_CIFAR100_NAMES  # the authors' prompt words ('apples', 'computer keyboard'), which their token choice was made for
    if args.inject == 'published' and len(classes) > len(OAL_INJECT_LABELS):
        fail(f'--inject published takes the token from OAL\'s list of {len(OAL_INJECT_LABELS)} CIFAR-100 labels, and {args.dataset} has '
             f'{len(classes)} classes: pass --inject fixed')
    args.teacher = args.teacher or TEACHERS.get(args.dataset, 'baseline')
    if args.teacher == 'baseline':
        args.teacher = f"runs/{args.dataset.replace(':', '_').replace('/', '_')}_ce_s0"
        if not Path(args.teacher).exists():
            fail(f'no teacher at {args.teacher}: train one with python train_sio.py --dataset {args.dataset} '
                 f'--out {args.teacher}, or pass --teacher RUN_OR_HUB_ID')
    forward, teacher = load_teacher(args.teacher, device, classes, args.teacher_class_order)
    teacher_acc = (teacher_accuracy(forward, ds['val'][0], ds['val'][1], device, args.teacher_min_acc, args.teacher, args.dataset)
                   if isinstance(ds['val'][0], np.ndarray) else None)  # folder datasets: file lists, not checked
    if teacher_acc is not None and rank == 0:
        print(f"teacher {teacher['name']}: val top-1 {100 * teacher_acc:.2f}% on {args.dataset} (inputs {teacher['image_size']}px)")
    teacher = {k: v for k, v in teacher.items() if k != 'module'}
    anchor = args.anchor or ('token' if len(classes) >= 100 else 'pooled')  # the paper's choice per dataset
    repeats = args.repeats or len(classes)
    knn_settings = dict(teacher=teacher['name'], features_per_class=args.features_per_class, knn_select=args.knn_select, knn_k=args.knn_k,
                        knn_sigma=args.knn_sigma, knn_draws=args.knn_draws, boundary=args.boundary, keep=args.keep, repeats=repeats,
                        anchor=anchor, class_names=names, seed=args.seed, dataset=args.dataset, crop=args.crop,
                        class_order=teacher['class_order'])  # the anchors' norms depend on the names
    if teacher['kind'] == 'checkpoint':  # a retrained teacher must not reuse old k-NN outliers
        knn_settings['teacher_stamp'] = f"{Path(teacher['name']).stat().st_size}:{Path(teacher['name']).stat().st_mtime_ns}"
    elif Path(args.teacher).is_dir():  # the same for a local transformers folder (a hub id names one fixed model)
        knn_settings['teacher_stamp'] = ','.join(f'{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}' for f in sorted(Path(args.teacher).iterdir()) if f.is_file())
    knn_file, knn_meta = out / 'knn_outliers.npy', out / 'knn_meta.json'
    if args.classes:  # the class names come from the folders, so a subset is told apart by its list (none: as before)
        knn_settings['classes'] = classes
    claim_set(out, dict(command='oal', pipeline=args.pipeline, scheduler=args.scheduler, steps=args.steps, guidance=args.guidance, prompt=args.prompt,
                        seed=args.seed, samples_per_iteration=args.samples_per_iteration, inject=args.inject, knn=knn_settings), args.overwrite, rank, world)
    pipe = load_pipeline(args.pipeline, device, args.dtype, args.scheduler)
    token_dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if rank == 0:
        (out / 'images').mkdir(exist_ok=True)
        (out / 'latents').mkdir(exist_ok=True)
    if world > 1:
        dist.barrier()

    # step 3: k-NN outliers (rank 0). claim_set above already refused a rerun with other settings,
    # so finished files from an earlier run are reused as they are.
    if rank == 0 and not (knn_file.exists() and knn_meta.exists()):
        t0 = time.time()
        recipe = RECIPE_AUGMENT[args.dataset if args.dataset in RECIPE_AUGMENT else 'folder']
        train_x, train_y = ds['train']
        if not isinstance(train_x, np.ndarray):
            train_x = read_images(train_x, teacher['image_size'])
        torch.manual_seed(args.seed)
        size = teacher['image_size'] if args.crop == 'published' else None  # OAL: Resize(224), flip, RandomCrop(224, padding=4)
        feats = teacher_features(forward, train_x, train_y, len(classes), args.features_per_class, *recipe, size, device, args.seed)
        norms = class_anchor_norms(pipe, names, anchor)
        g = torch.Generator().manual_seed(args.seed)
        knn = torch.stack([knn_outliers(feats[c], args.knn_k, args.boundary, args.knn_sigma, args.knn_draws, args.keep, repeats,
                                        args.knn_select, g) * norms[c] for c in range(len(classes))])
        save_npy_atomic(knn.cpu().numpy().astype(np.float32), knn_file)
        write_json(dict(knn_settings, anchor_norms=norms), knn_meta)
        print(f'knn: teacher features {tuple(feats.shape)} -> outliers {tuple(knn.shape)} ({args.knn_select} selection, '
              f'{anchor} anchor, mean norm {np.mean(norms):.3f}) in {time.time() - t0:.1f}s')
    if world > 1:
        dist.barrier()
    knn = torch.from_numpy(np.load(knn_file))
    d = knn.shape[-1]
    proj = projection(d, token_dim, args.seed) if d != token_dim else None  # teacher space -> token-embedding space

    # step 4: diffusion outliers; iteration i draws its class, outlier and noise from (seed, i) alone. One pipeline call
    # runs the iterations of a fixed index range (--batch-size images), so a resumed run recomputes whole calls; with
    # --batch-size = --samples-per-iteration it is the paper's one call per iteration, bit for bit (a larger batch changes
    # only float rounding: each iteration keeps its own prompt embedding and noise).
    from diffusers.utils.torch_utils import randn_tensor
    n = args.samples_per_iteration
    per_call = max(1, args.batch_size // n)
    calls = [range(b, min(b + per_call, args.iterations)) for b in range(0, args.iterations, per_call)]
    todo = [c for k, c in enumerate(calls) if k % world == rank and not all((out / 'latents' / f'{i:04d}.npy').exists() for i in c)]
    if args.max_batches is not None:
        todo = todo[:args.max_batches]
    cfg = args.guidance > 1 and pipe.unet.config.time_cond_proj_dim is None  # as the pipeline decides
    shape = (n, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    t0 = time.time()
    for call in tqdm(todo, desc='oal diffusion outliers', disable=rank != 0):
        drawn, embeds, negatives, noise = [], [], [], []
        for i in call:
            rng = np.random.RandomState(args.seed * 1000 + i)
            c = rng.randint(len(classes))
            vector = knn[c, rng.randint(min(1000, knn.shape[1]))]
            vector = vector @ proj if proj is not None else vector
            with injected(pipe.text_encoder, injected_tokens(pipe.tokenizer, names, c, args.inject), vector), torch.no_grad():
                embed, negative = pipe.encode_prompt(args.prompt.format(names[c]), device, n, cfg)
            drawn.append(c)
            embeds.append(embed)
            negatives.append(negative)
            noise.append(randn_tensor(shape, generator=torch.Generator(device).manual_seed(args.seed * 1000 + i), device=device, dtype=embed.dtype))
        with torch.no_grad():
            latents = pipe(prompt_embeds=torch.cat(embeds), negative_prompt_embeds=torch.cat(negatives) if cfg else None, latents=torch.cat(noise),
                           num_inference_steps=args.steps, guidance_scale=args.guidance, output_type='latent').images
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        images = (decoded.float().clamp(-1, 1) * 127.5 + 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        pooled = latents.float().mean(dim=1).mean(dim=1).cpu().numpy()  # channels, then rows: one vector of latent width per sample
        for j, (i, c) in enumerate(zip(call, drawn)):
            for k, image in enumerate(images[j * n:(j + 1) * n]):
                save_png_atomic(image, out / 'images' / f'{i:04d}_{k}_{classes[c]}.png')
            save_npy_atomic(pooled[j * n:(j + 1) * n].astype(np.float32), out / 'latents' / f'{i:04d}.npy')
    if world > 1:
        dist.barrier()
    if rank == 0:
        files = [out / 'latents' / f'{i:04d}.npy' for i in range(args.iterations)]
        done = all(f.exists() for f in files)
        if done:
            save_npy_atomic(np.concatenate([np.load(f) for f in files]), out / 'diffusion_outliers.npy')
        write_json(dict(dataset=args.dataset, classes=classes, prompts=[args.prompt.format(n) for n in names], teacher=dict(teacher, val_acc=teacher_acc),
                        pipeline=args.pipeline, scheduler=type(pipe.scheduler).__name__, inject=args.inject,
                        steps=args.steps, guidance=args.guidance, prompt=args.prompt, seed=args.seed, iterations=args.iterations,
                        samples_per_iteration=args.samples_per_iteration, knn_outliers=list(knn.shape), anchor=anchor,
                        anchor_norms=json.loads(knn_meta.read_text())['anchor_norms'], knn_select=args.knn_select,
                        projection=None if proj is None else dict(kind='seeded random orthogonal', seed=args.seed, shape=[d, token_dim]),
                        diffusion_outliers=[args.iterations * args.samples_per_iteration, int(np.load(files[0]).shape[-1])] if done else None,
                        complete=done), out / 'meta.json')
        print(f'oal: {sum(map(len, todo)) * world} iterations in {time.time() - t0:.1f}s; ' +
              ('complete' if done else 'incomplete: run the same command again to continue') + f' -> {out}')
    if world > 1:
        dist.destroy_process_group()


RECIPE_AUGMENT = {'digits': (1, False), 'cifar10': (4, True), 'cifar100': (4, True), 'folder': (0, True)}  # (crop pad, flip) as in training


# ----------------------------------------------------------------------------------------------
# fractals: a stand-in for PixMix's mixing set (its fractals_and_fvis download) on an offline machine.

def ifs_fractal(rng, size, points=50000):
    """One random iterated function system (2-4 contractive affine maps, chosen by |det|), run as 1,000 chaos-game
    chains; each map has its own colour, pixel brightness follows log hit counts, on black (as PixMix's fractals)."""
    maps = rng.randint(2, 5)
    linear = rng.uniform(-1, 1, (maps, 2, 2))
    linear *= rng.uniform(0.5, 0.95, (maps, 1, 1)) / np.linalg.norm(linear, 2, axis=(1, 2))[:, None, None]  # largest singular value < 1
    shift = rng.uniform(-1, 1, (maps, 2))
    weights = np.abs(np.linalg.det(linear)) + 1e-3
    colours = rng.uniform(0.2, 1, (maps, 3))
    xy, hits, which = rng.uniform(-1, 1, (1000, 2)), [], []
    for step in range(20 + points // 1000):
        k = rng.choice(maps, size=len(xy), p=weights / weights.sum())
        xy = np.einsum('nij,nj->ni', linear[k], xy) + shift[k]
        if step >= 20:  # past the transient, the chains lie on the attractor
            hits.append(xy.copy())
            which.append(k)
    xy, which = np.concatenate(hits), np.concatenate(which)
    low, high = xy.min(0), xy.max(0)
    pixel = ((xy - low) / np.maximum(high - low, 1e-9) * (size - 1)).round().astype(int)
    image = np.zeros((size, size, 3))
    counts = np.zeros((size, size))
    np.add.at(image, (pixel[:, 1], pixel[:, 0]), colours[which])
    np.add.at(counts, (pixel[:, 1], pixel[:, 0]), 1)
    brightness = np.log1p(counts) / np.log1p(counts.max())
    return (image / np.maximum(counts, 1)[..., None] * brightness[..., None] * 255).round().astype(np.uint8)


def generate_fractals(args):
    out = Path(args.out)
    check_out(out)
    claim_set(out, dict(command='fractals', count=args.count, size=args.size, seed=args.seed), args.overwrite, 0, 1)
    t0, made = time.time(), 0
    for i in tqdm(range(args.count), desc='fractals'):
        path = out / f'{i:05d}.png'
        if not readable_image(path):  # every picture depends only on (seed, index): a rerun makes only the missing ones
            save_png_atomic(ifs_fractal(np.random.RandomState([args.seed, i]), args.size), path)
            made += 1
    print(f'fractals: {made} made, {args.count - made} already there, in {time.time() - t0:.1f}s -> {out}')


def main(argv=None):
    args = get_args(argv)
    {'fit': fit, 'sio': generate_sio, 'oal': generate_oal, 'fractals': generate_fractals}[args.command](args)


if __name__ == '__main__':
    main()
