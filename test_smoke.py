"""Behaviour tests for synth-ood: tiny data, tiny models, no network, a 2-core CPU.

    python -m pytest -q test_smoke.py
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
import train_sio

REPO = Path(__file__).resolve().parent
# No test may reach the network: downloads hit a closed local port and fail at once.
OFFLINE = dict(os.environ, HTTPS_PROXY='http://127.0.0.1:9', HTTP_PROXY='http://127.0.0.1:9', https_proxy='http://127.0.0.1:9',
               http_proxy='http://127.0.0.1:9', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', PYTHONUNBUFFERED='1')


def run_script(*args, cwd=REPO, torchrun=0):
    """Run a script as a user would; returns the CompletedProcess (stdout+stderr as text)."""
    launcher = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={torchrun}', '--master_port=29533'] if torchrun else [sys.executable]
    return subprocess.run(launcher + [str(REPO / args[0])] + [str(a) for a in args[1:]], cwd=cwd, env=OFFLINE, capture_output=True, text=True, timeout=600)


def assert_user_error(proc, *words):
    """Exit code 2, one line on stderr, no traceback, and the line names the fix."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def two_ranks(main, argv, logs):
    """main(argv) as ranks 0 and 1 of a 2-process gloo group in forked children of this process: the environment torchrun
    gives its workers (RANK, WORLD_SIZE, MASTER_ADDR/PORT), without an interpreter start-up per process (one test still
    runs real torchrun). Returns (exit codes, stdout + stderr of each rank)."""
    import multiprocessing
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]

    def child(rank):
        torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1; a forked child must not reuse the parent's OpenMP pool
        sys.stdout = sys.stderr = open(logs / f'rank{rank}.log', 'w', buffering=1)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', LOCAL_WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        main([str(a) for a in argv])
    logs.mkdir(parents=True, exist_ok=True)
    procs = [multiprocessing.get_context('fork').Process(target=child, args=(rank,)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(600)
    return [proc.exitcode for proc in procs], [(logs / f'rank{rank}.log').read_text() for rank in (0, 1)]


def main_error(capsys, main, *args):
    """A script's main() in this process (no interpreter start-up): exit code 2, no traceback (any other
    exception fails the test) and one 'error:' line, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = [l for l in err.splitlines() if l.startswith('error:')]
    assert len(lines) == 1, err
    return lines[0]


def digits_train_set():
    ds = train_sio.load_dataset('digits')
    return ds['train']


@pytest.fixture(scope='session')
def runs(tmp_path_factory):
    """Two baseline seeds and one SIO run on digits, shared by the tests below."""
    root = tmp_path_factory.mktemp('runs')
    images, labels = digits_train_set()
    # A stand-in synthetic set until generate.py's is used: shifted + noised copies of the real digits.
    rng = np.random.RandomState(1)
    fake = np.clip(np.roll(images, 1, axis=2).astype(int) + rng.randint(-20, 21, images.shape), 0, 255).astype(np.uint8)
    syn = root / 'syn'
    syn.mkdir()
    np.save(syn / 'images.npy', fake)
    np.save(syn / 'labels.npy', labels)
    for seed in (0, 1):
        train_sio.main(['--dataset', 'digits', '--epochs', '8', '--seed', str(seed), '--out', str(root / f'ce_s{seed}')])
    train_sio.main(['--dataset', 'digits', '--epochs', '8', '--synthetic', str(syn), '--out', str(root / 'sio_s0')])
    return root


# ================================================================================================
# train_sio.py

def test_sio_batches_cifar_composition():
    g = torch.Generator().manual_seed(0)
    plan = train_sio.sio_batches(50000, 50000, 128, 0.8, g)
    assert len(plan) == math.ceil(50000 / 128) == 391
    assert all(len(r) == 102 and len(s) == 26 for r, s in plan)
    real = torch.cat([r for r, _ in plan])
    assert len(real.unique()) == len(real) == 391 * 102  # no repeats: 39,882 of 50,000 real per epoch
    plan2 = train_sio.sio_batches(50000, 50000, 128, 0.8, g)
    assert not torch.equal(plan[0][0], plan2[0][0]) and not torch.equal(plan[0][1], plan2[0][1])  # reshuffled


def test_sio_batches_small_synthetic_and_baseline():
    g = torch.Generator().manual_seed(0)
    plan = train_sio.sio_batches(1000, 30, 128, 0.8, g)  # fewer synthetic than needed: whole permutations, repeated
    syn = torch.cat([s for _, s in plan])
    assert len(plan) == 8 and len(syn) == 8 * 26
    assert torch.equal(syn[:30].sort().values, torch.arange(30))
    base = train_sio.sio_batches(1000, 0, 128, 1.0, g)
    assert [len(r) for r, _ in base] == [128] * 7 + [104]
    assert torch.equal(torch.cat([r for r, _ in base]).sort().values, torch.arange(1000))


def test_runs_write_checkpoint_contract(runs):
    for name, synthetic_seen, real_seen in (('ce_s0', 0, 647), ('sio_s0', 11 * 13, 11 * 51)):
        best = torch.load(runs / name / 'best.pt', weights_only=False)
        last = torch.load(runs / name / 'last.pt', weights_only=False)
        for key in ('model', 'arch', 'num_classes', 'classes', 'dataset', 'image_size', 'mean', 'std', 'epoch', 'val_acc', 'args'):
            assert key in best and key in last, key
        for key in ('optimizer', 'scheduler', 'scaler', 'rng'):
            assert key in last, key
        assert not any(k.startswith(('module.', '_orig_mod.')) for k in best['model'])
        assert best['num_classes'] == 6 and best['classes'][0] == 'zero' and best['image_size'] == 8
        assert best['val_acc'] > 0.85, best['val_acc']
        log = [json.loads(l) for l in (runs / name / 'log.jsonl').read_text().splitlines()]
        assert [r['epoch'] for r in log] == list(range(1, 9))
        assert all(r['real_seen'] == real_seen and r['synthetic_seen'] == synthetic_seen and r['images_per_s'] > 0 for r in log)
        assert max(r['val_acc'] for r in log) == pytest.approx(best['val_acc'])


def test_a_damaged_last_pt_is_refused_on_resume(tmp_path, capsys):
    """A last.pt edited by hand (an epoch beyond the run, a float epoch, no best accuracy, a learning rate that is no
    number, another scheduler) is one line on --resume, never a traceback or a run marked finished too early."""
    args = ['--dataset', 'digits', '--epochs', '3', '--out', tmp_path / 'run']
    train_sio.main([str(a) for a in args + ['--stop-after', '1']])
    good = torch.load(tmp_path / 'run' / 'last.pt', weights_only=False)
    lr_text = dict(good['optimizer'], param_groups=[dict(good['optimizer']['param_groups'][0], lr='x')])
    for change in (dict(epoch=7), dict(epoch=1.0), dict(epoch=-1), dict(best_val_acc=None), dict(optimizer=lr_text),
                   dict(scheduler={'a': 1})):
        torch.save(dict(good, **change), tmp_path / 'run' / 'last.pt')
        assert 'damaged' in main_error(capsys, train_sio.main, *args, '--resume'), change
    torch.save(good, tmp_path / 'run' / 'last.pt')
    train_sio.main([str(a) for a in args + ['--resume']])
    assert json.loads((tmp_path / 'run' / 'log.jsonl').read_text().splitlines()[-1])['epoch'] == 3


def test_an_error_under_a_progress_bar_starts_its_own_line(tmp_path):
    """stderr to a file: the bar's carriage returns do not hide the error from a reader of whole lines."""
    assert_user_error(run_script('train_sio.py', '--dataset', 'digits', '--epochs', '2', '--lr', '3e38', '--out',
                                 tmp_path / 'run'), 'loss is nan')


def test_resume_gives_identical_weights(tmp_path):
    common = ['--dataset', 'digits', '--epochs', '4', '--seed', '3']
    # straight: seeds 2 and 3 one after the other in one process, each run exactly as if started alone
    train_sio.main(common[:-1] + ['2,3', '--out', str(tmp_path / 'seed{seed}')])
    (tmp_path / 'seed3').rename(tmp_path / 'straight')
    other = torch.load(tmp_path / 'seed2' / 'last.pt', weights_only=False)
    assert other['args']['seed'] == 2 and other['args']['out'] == str(tmp_path / 'seed2') and 'seeds' not in other['args']
    train_sio.main(common + ['--out', str(tmp_path / 'split'), '--stop-after', '2'])
    assert json.loads((tmp_path / 'split' / 'log.jsonl').read_text().splitlines()[-1])['epoch'] == 2
    (tmp_path / 'split' / 'log.jsonl').unlink()  # as if killed between writing last.pt and log.jsonl: the rows live in last.pt too
    train_sio.main(common + ['--out', str(tmp_path / 'split'), '--resume', '--workers', '0'])  # a flag that changes nothing may differ
    a = torch.load(tmp_path / 'straight' / 'last.pt', weights_only=False)
    b = torch.load(tmp_path / 'split' / 'last.pt', weights_only=False)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    logs = [[json.loads(l) for l in (tmp_path / run / 'log.jsonl').read_text().splitlines()] for run in ('straight', 'split')]
    assert [r['epoch'] for r in logs[1]] == [1, 2, 3, 4]
    assert [r['val_acc'] for r in logs[0]] == [r['val_acc'] for r in logs[1]]


def test_a_full_disk_names_the_file_and_keeps_the_last_good_one(tmp_path, capsys, monkeypatch):
    common = ['--dataset', 'digits', '--epochs', '2', '--out', tmp_path / 'run']
    train_sio.main([str(a) for a in common + ['--stop-after', '1']])
    good = (tmp_path / 'run' / 'last.pt').read_bytes()

    def full_disk(obj, file, *args, **kwargs):
        Path(file).write_bytes(b'half')
        raise RuntimeError('[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: file write failed')
    monkeypatch.setattr(torch, 'save', full_disk)
    error = main_error(capsys, train_sio.main, *common, '--resume')
    assert 'could not write' in error and 'intact' in error
    assert (tmp_path / 'run' / 'last.pt').read_bytes() == good and not list((tmp_path / 'run').glob('*.tmp'))


def test_oe_outliers_are_unaugmented_and_in_permutation_order(tmp_path, monkeypatch):
    """The SIO code's OE: outliers with the test transform, the next ones of a per-epoch permutation; --oe-augment is the old draw."""
    outliers = np.random.RandomState(0).randint(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / 'ood.npy', outliers)
    seen = []

    class Stop(Exception):
        pass

    def first_batch(self, x, features=False):
        seen.append(x)
        raise Stop
    monkeypatch.setattr(train_sio.Net, 'forward', first_batch)
    for extra in ([], ['--oe-augment']):
        with pytest.raises(Stop):
            train_sio.main(['--dataset', 'digits', '--method', 'oe', '--oe-data', str(tmp_path / 'ood.npy'), '--batch-size', '16',
                            '--epochs', '1', '--out', str(tmp_path / f'run{len(extra)}')] + extra)
    ds = train_sio.load_dataset('digits')
    generator = torch.Generator().manual_seed(0)  # seed 0, epoch 0: the batch plan first, then the outlier order
    plan = train_sio.sio_batches(len(ds['train'][1]), 0, 16, 1.0, generator)
    order = train_sio.draw(50, len(plan) * 32, generator)
    expected = train_sio.normalize(torch.from_numpy(outliers[order[:32].numpy()]).permute(0, 3, 1, 2), ds['mean'], ds['std'], 8)
    assert seen[0].shape[0] == 16 + 32 and torch.equal(seen[0][16:], expected)
    assert not torch.equal(seen[1][16:], expected)


def test_torchrun_two_processes(tmp_path):
    seeds = ['--dataset', 'digits', '--epochs', '2', '--seed', '0,1', '--out', tmp_path / 'ddp_s{seed}']
    for extra in (['--stop-after', '1'], ['--resume']):  # two seeds stopped after epoch 1, then both continued
        proc = run_script('train_sio.py', *seeds, *extra, torchrun=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in (0, 1):
        log = [json.loads(l) for l in (tmp_path / f'ddp_s{seed}' / 'log.jsonl').read_text().splitlines()]
        assert len(log) == 2 and log[-1]['real_seen'] == 647
        assert torch.load(tmp_path / f'ddp_s{seed}' / 'best.pt', weights_only=False)['val_acc'] > 0.3


def test_method_losses_by_hand():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    y = torch.tensor([0, 1])
    ce = -(torch.log(torch.exp(z[0, 0]) / torch.exp(z[0]).sum()) + torch.log(torch.exp(z[1, 1]) / torch.exp(z[1]).sum())) / 2
    assert train_sio.method_loss('ce', z, y).item() == pytest.approx(ce.item(), rel=1e-6)
    zn = z / z.norm(dim=1, keepdim=True) / 0.04
    ln = -(F.log_softmax(zn, 1)[0, 0] + F.log_softmax(zn, 1)[1, 1]) / 2
    assert train_sio.method_loss('logitnorm', z, y, tau=0.04).item() == pytest.approx(ln.item(), rel=1e-5)
    outliers = torch.tensor([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
    uniform_ce = [math.log(3), math.log(math.exp(3) + 2) - 1.0]  # logsumexp - mean logit, per outlier
    oe = train_sio.method_loss('oe', torch.cat([z, outliers]), y, oe_weight=0.5).item()
    assert oe == pytest.approx(ce.item() + 0.5 * sum(uniform_ce) / 2, rel=1e-6)
    y_mix = torch.tensor([1, 0])
    ce_mix = -(F.log_softmax(z, 1)[0, 1] + F.log_softmax(z, 1)[1, 0]) / 2
    assert train_sio.method_loss('cutmix', z, y, mix_labels=y_mix, lam=0.3).item() == pytest.approx(0.3 * ce.item() + 0.7 * ce_mix.item(), rel=1e-6)


def test_cutmix_lambda_is_kept_area():
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    x[1] = 1
    x[2] = 2
    x[3] = 3
    mixed, labels_b, lam = train_sio.cutmix(x, torch.arange(4))
    for i in range(4):
        kept = (mixed[i] == x[i]).float().mean().item()
        if labels_b[i] != i:
            assert kept == pytest.approx(lam, abs=1e-6)


def test_pixmix_ops_match_pil():
    """Every AugMix operation, batched on tensors, against PIL at fixed parameters: at most 2 grey levels apart."""
    from PIL import Image, ImageEnhance, ImageOps
    rng = np.random.RandomState(0)
    image = (rng.rand(32, 32, 3) * 200 + 20).astype(np.uint8)
    image[8:20, 5:25] = 240
    pil, x = Image.fromarray(image), torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    one = lambda v: torch.tensor([float(v)])
    affine = lambda data: pil.transform((32, 32), Image.AFFINE, data, resample=Image.BILINEAR)
    pairs = {
        'autocontrast': (ImageOps.autocontrast(pil), train_sio.autocontrast(x)),
        'equalize': (ImageOps.equalize(pil), train_sio.equalize(x)),
        'posterize': (ImageOps.posterize(pil, 3), train_sio.posterize(x, one(3))),
        'solarize': (ImageOps.solarize(pil, 180), train_sio.solarize(x, one(180))),
        'rotate': (pil.rotate(20, resample=Image.BILINEAR), train_sio.geometric(x, 'rotate', one(20))),
        'shear_x': (affine((1, 0.2, 0, 0, 1, 0)), train_sio.geometric(x, 'shear_x', one(0.2))),
        'shear_y': (affine((1, 0, 0, -0.2, 1, 0)), train_sio.geometric(x, 'shear_y', one(-0.2))),
        'translate_x': (affine((1, 0, 5, 0, 1, 0)), train_sio.geometric(x, 'translate_x', one(5))),
        'translate_y': (affine((1, 0, 0, 0, 1, -3)), train_sio.geometric(x, 'translate_y', one(-3))),
        'color': (ImageEnhance.Color(pil).enhance(0.4), train_sio.blend(train_sio.grey(x), x, one(0.4))),
        'contrast': (ImageEnhance.Contrast(pil).enhance(1.5), train_sio.blend(train_sio.grey(x).mean((1, 2, 3), keepdim=True).add(0.5).floor(), x, one(1.5))),
        'brightness': (ImageEnhance.Brightness(pil).enhance(1.3), train_sio.blend(torch.zeros(()), x, one(1.3))),
        'sharpness': (ImageEnhance.Sharpness(pil).enhance(1.7), train_sio.blend(train_sio.smooth(x), x, one(1.7))),
    }
    assert set(pairs) == set(train_sio.PIXMIX_OPS)
    for name, (expected, got) in pairs.items():
        assert got.dtype == torch.uint8 and got.shape == x.shape, name
        gap = np.abs(np.asarray(expected).astype(int) - got[0].permute(1, 2, 0).numpy().astype(int))
        assert gap.max() <= 2 and gap.mean() < 0.5, (name, gap.max(), gap.mean())
        assert not np.array_equal(np.asarray(expected), image), name  # the op did something


def test_pixmix_on_a_batch():
    """Range, the number of mixings (none at k = 0: every op maps black to black), mixing at k = 4, determinism under a seed."""
    rng = np.random.RandomState(0)
    x = torch.from_numpy(rng.randint(0, 256, (64, 3, 16, 16), dtype=np.uint8))
    pics = torch.from_numpy(rng.randint(0, 256, (64, 3, 16, 16), dtype=np.uint8))
    torch.manual_seed(1)
    out = train_sio.pixmix(x, pics)
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 255
    torch.manual_seed(1)
    assert torch.equal(train_sio.pixmix(x, pics), out)  # same seed, same batch
    assert not torch.equal(train_sio.pixmix(x, pics), out)
    black, white = torch.zeros(200, 3, 16, 16, dtype=torch.uint8), torch.full((200, 3, 16, 16), 255, dtype=torch.uint8)
    for ops in (True, False):
        assert train_sio.pixmix(black, white, k=0, all_ops=ops).abs().max() == 0  # no mixing round, only ops that keep black
        assert train_sio.pixmix(black, white, k=4, rounds=torch.zeros(200), all_ops=ops).abs().max() == 0
    # Black image, white mixing picture: every op keeps black, so PixMix reduces to scalars. The share of images that
    # end non-black, against the PixMix code's loop written out per image in numpy (0..k rounds, partner, add/multiply, a, b).
    def reference(k, draws=20000, rng=np.random.RandomState(0)):
        ends_lit = 0
        for _ in range(draws):
            mixed = 0.0
            for _ in range(rng.randint(k + 1)):
                partner = 0.0 if rng.random_sample() < 0.5 else 1.0
                add = rng.random_sample() < 0.5
                if rng.random_sample() < 0.5:
                    a, b = rng.beta(3, 1), rng.beta(1, 3)
                else:
                    a, b = 1 + rng.beta(1, 3), -rng.beta(1, 3)
                mixed = (a * (2 * mixed - 1) + b * (2 * partner - 1) + 1) / 2 if add else (2 * mixed) ** a * max(2 * partner, 1e-37) ** b / 2
                mixed = min(max(mixed, 0.0), 1.0)
            ends_lit += mixed > 0
        return ends_lit / draws
    black, white = torch.zeros(4000, 3, 2, 2, dtype=torch.uint8), torch.full((4000, 3, 2, 2), 255, dtype=torch.uint8)
    for k in (1, 4):
        lit = (train_sio.pixmix(black, white, k=k, all_ops=False).flatten(1).amax(1) > 0).float().mean().item()
        assert lit == pytest.approx(reference(k), abs=0.03), k


def test_digits_are_read_as_sklearn_loads_them():
    """The digits come from scikit-learn's own CSV (no sklearn.datasets import at start-up): the same pixels and labels."""
    from sklearn.datasets import load_digits
    images, labels = train_sio.digits_images()
    digits = load_digits()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8, 3) and labels.dtype == np.int64
    assert np.array_equal(images[..., 0], np.rint(digits.images * 255 / 16).astype(np.uint8)) and np.array_equal(labels, digits.target)
    assert (images[..., 0] == images[..., 2]).all()


def test_fractal_mixing_set_resumes_and_keeps_its_settings(tmp_path, capsys):
    out = tmp_path / 'fractals'
    generate.main(['fractals', '--out', str(out), '--count', '6', '--size', '16'])
    from PIL import Image
    images = {p.name: np.asarray(Image.open(p)) for p in sorted(out.glob('*.png'))}
    assert list(images) == [f'{i:05d}.png' for i in range(6)]
    assert all(im.shape == (16, 16, 3) and im.max() > 0 and (im == 0).mean() > 0.1 for im in images.values())  # coloured shapes on black
    assert len({im.tobytes() for im in images.values()}) == 6
    first = {name: (out / name).read_bytes() for name in images}
    (out / '00002.png').unlink()
    (out / '00004.png').write_bytes(first['00004.png'][:20])  # damaged: made again
    capsys.readouterr()
    generate.main(['fractals', '--out', str(out), '--count', '6', '--size', '16'])
    assert '2 made, 4 already there' in capsys.readouterr().out
    assert all((out / name).read_bytes() == data for name, data in first.items())
    with pytest.raises(SystemExit):  # other settings over a finished set: refused, nothing touched
        generate.main(['fractals', '--out', str(out), '--count', '6', '--size', '24'])
    assert 'size 16 -> 24' in capsys.readouterr().err and (out / '00000.png').read_bytes() == first['00000.png']


def test_augment_crops_and_flips_in_batch():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    torch.manual_seed(0)
    out = train_sio.augment(x, pad=1, flip=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(2):  # each output is a shifted (maybe flipped) window of the zero-padded input
        padded = F.pad(x[i], (1, 1, 1, 1))
        windows = [padded[:, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_nan_loss_stops_with_epoch_and_step(tmp_path, capsys):
    line = main_error(capsys, train_sio.main, '--dataset', 'digits', '--epochs', '2', '--lr', '1e30', '--out', tmp_path / 'nan')
    assert 'epoch 1 step' in line and 'nothing was saved' in line
    assert not (tmp_path / 'nan' / 'last.pt').exists()


def test_missing_cifar_is_one_line(tmp_path, capsys, monkeypatch):
    for name, value in OFFLINE.items():  # the download fails at once, as on an offline machine
        if 'proxy' in name.lower():
            monkeypatch.setenv(name, value)
    line = main_error(capsys, train_sio.main, '--dataset', 'cifar10', '--data-root', tmp_path / 'nodata', '--epochs', '1', '--out', tmp_path / 'x')
    assert str(tmp_path / 'nodata') in line and '--data-root' in line
    # as a user runs it (an error found before any data is read, so the interpreter start-up is all it costs)
    assert_user_error(run_script('train_sio.py', '--epochs', '0', '--out', tmp_path / 'y'), '--epochs')


@pytest.mark.parametrize('case', ['class_count', 'label_range', 'shape'])
def test_bad_synthetic_sets(tmp_path, capsys, case):
    images, labels = digits_train_set()
    if case == 'class_count':
        keep = labels < 4
        images, labels, words = images[keep], labels[keep], ('4 classes', '6')
    elif case == 'label_range':
        labels = labels.copy()
        labels[0], words = 9, ('labels span', '6 classes')
    else:
        images, words = images[..., 0], ('uint8 (N, H, W, 3)',)
    np.save(tmp_path / 'images.npy', images)
    np.save(tmp_path / 'labels.npy', labels)
    error = main_error(capsys, train_sio.main, '--dataset', 'digits', '--synthetic', tmp_path, '--epochs', '1', '--out', tmp_path / 'x')
    assert all(word in error for word in words), error


def test_synthetic_class_folders_are_read_with_padded_labels(tmp_path, capsys):
    from PIL import Image
    images, labels = digits_train_set()
    for c in range(6):
        (tmp_path / f'{c:03d}').mkdir()
        for n, i in enumerate(np.flatnonzero(labels == c)[:3]):
            Image.fromarray(images[i]).save(tmp_path / f'{c:03d}' / f'{n}.png')
    got_images, got_labels = train_sio.load_synthetic(tmp_path, 'digits', train_sio.DIGIT_NAMES[:6], 8)
    assert got_images.shape == (18, 8, 8, 3) and list(got_labels) == [c for c in range(6) for _ in range(3)]
    assert np.array_equal(got_images[:3], images[np.flatnonzero(labels == 0)[:3]])
    # every image extension counts (class 5 as JPEG only); other files are skipped with a note
    for n, i in enumerate(np.flatnonzero(labels == 5)[:3]):
        (tmp_path / '005' / f'{n}.png').unlink()
        Image.fromarray(images[i]).save(tmp_path / '005' / f'{n}.JPG')
    (tmp_path / '002' / 'notes.txt').write_text('not an image')
    (tmp_path / '003' / 'more').mkdir()  # a class folder's images lie in it: one deeper is said, not read
    Image.fromarray(images[0]).save(tmp_path / '003' / 'more' / '0.png')
    got_images, got_labels = train_sio.load_synthetic(tmp_path, 'digits', train_sio.DIGIT_NAMES[:6], 8)
    assert list(got_labels) == [c for c in range(6) for _ in range(3)]
    assert '2 entries in' in (err := capsys.readouterr().err) and 'are not images (or are folders) and are skipped' in err


def test_images_are_read_as_loaders_read_them_or_refused(tmp_path):
    """16-bit grey by its high byte (PIL's convert('RGB') would clip 86% of this ramp to white), as PIL reads 16-bit
    colour; palette and alpha as torchvision's loader (convert); floating-point pixels and huge images refused."""
    import struct
    import zlib
    from PIL import Image
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / 'grey16.png')
    assert (np.asarray(Image.open(tmp_path / 'grey16.png').convert('RGB'))[..., 0] == 255).mean() > 0.8  # the trap
    read = train_sio.read_image(tmp_path / 'grey16.png')
    assert read.dtype == np.uint8 and read.shape == (64, 64, 3) and np.array_equal(read[..., 1], (ramp >> 8).astype(np.uint8))

    def png16(path, array):  # a 16-bit RGB PNG written by hand: PIL keeps each value's high byte
        chunk = lambda kind, data: struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
        rows = b''.join(b'\x00' + row.astype('>u2').tobytes() for row in array)
        path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 4, 4, 16, 2, 0, 0, 0))
                         + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))
    colour = np.random.RandomState(0).randint(0, 65536, (4, 4, 3)).astype(np.uint16)
    png16(tmp_path / 'rgb16.png', colour.reshape(4, 12))
    assert np.array_equal(train_sio.read_image(tmp_path / 'rgb16.png'), (colour >> 8).astype(np.uint8))
    palette = Image.new('P', (4, 4))
    palette.putpalette([200, 10, 10] + [0] * 765)
    palette.save(tmp_path / 'palette.png', transparency=0)
    rgba = Image.fromarray(np.dstack([np.full((4, 4, 3), 90, np.uint8), np.zeros((4, 4), np.uint8)]), 'RGBA')
    rgba.save(tmp_path / 'alpha.png')
    for name in ('palette.png', 'alpha.png'):
        assert np.array_equal(train_sio.read_image(tmp_path / name), np.asarray(Image.open(tmp_path / name).convert('RGB')))
    Image.fromarray(np.zeros((4, 4), np.float32), mode='F').save(tmp_path / 'float.tiff')
    with pytest.raises(train_sio.BadImage, match='floating-point'):
        train_sio.read_image(tmp_path / 'float.tiff')


def test_a_folder_split_that_lacks_a_class_is_labelled_by_name(tmp_path):
    """test/ without class b: its c images are class 2 (by name), not class 1 (by position among test/'s folders)."""
    from PIL import Image
    for split, names in (('train', 'abc'), ('val', 'abc'), ('test', 'ac')):
        for c, name in enumerate(names):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.full((4, 4, 3), 80 * c, np.uint8)).save(tmp_path / split / name / '0.png')
    ds = train_sio.load_dataset(f'folder:{tmp_path}')
    assert ds['classes'] == ['a', 'b', 'c'] and list(ds['test'][1]) == [0, 2] and ds['test'][0][1].endswith('/c/0.png')


def test_a_synthetic_set_that_cannot_fit_in_memory_is_refused_with_the_estimate(tmp_path, capsys):
    images = np.lib.format.open_memmap(tmp_path / 'images.npy', mode='w+', dtype=np.uint8, shape=(200000, 256, 256, 3))
    del images  # a sparse file: 39 GB that take no disk
    np.save(tmp_path / 'labels.npy', np.arange(200000) % 6)
    error = main_error(capsys, train_sio.main, '--dataset', 'digits', '--synthetic', tmp_path, '--out', tmp_path / 'run')
    assert 'needs' in error and 'GiB' in error and 'free' in error and not (tmp_path / 'run').exists()


def test_digits_split_is_the_spec_split():
    ds = train_sio.load_dataset('digits')
    from sklearn.datasets import load_digits
    target = load_digits().target
    idx0 = np.flatnonzero(target == 0)
    perm = idx0[np.random.RandomState(0).permutation(len(idx0))]
    n_train = int(0.6 * len(idx0))
    assert len(ds['train'][1]) == 647 and len(ds['val'][1]) == 106 and len(ds['test'][1]) == 330
    expected = np.repeat((load_digits().images[perm[:n_train]] * 255 / 16).round().astype(np.uint8)[..., None], 3, -1)
    assert np.array_equal(ds['train'][0][:n_train], expected)


# ================================================================================================
# evaluate.py

def test_metrics_perfect_separation_and_full_overlap():
    m = evaluate.ood_metrics(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    assert m == pytest.approx(dict(FPR95=0.0, AUROC=100.0, AUPR_IN=100.0, AUPR_OUT=100.0, FPR95_ID=0.0))
    m = evaluate.ood_metrics(np.ones(4), np.ones(4))
    assert m['AUROC'] == pytest.approx(50.0) and m['FPR95'] == pytest.approx(100.0) and m['FPR95_ID'] == pytest.approx(100.0)


def test_metrics_interleaved_by_hand():
    # ID scores 4, 2; OOD scores 3, 1. Pairs ID>OOD: (4,3) (4,1) (2,1) of 4 -> AUROC 75%.
    # OOD positive on -s: thresholds -1 (tpr .5, fpr 0), -2 (.5, .5), -3 (1, .5): FPR@95 = 50%.
    # AUPR-In, precision-recall of ID on s: (R, P) = (1, 2/3) at s>=2, (.5, .5) at s>=3, (.5, 1) at s>=4,
    # then (0, 1); trapezoids: .5 * (2/3 + .5) / 2 + 0 + .5 * 1.
    m = evaluate.ood_metrics(np.array([4.0, 2.0]), np.array([3.0, 1.0]))
    assert m['AUROC'] == pytest.approx(75.0)
    assert m['FPR95'] == pytest.approx(50.0) and m['FPR95_ID'] == pytest.approx(50.0)
    assert m['AUPR_IN'] == pytest.approx(100 * (0.5 * (2 / 3 + 0.5) / 2 + 0.5))
    # AUPR-Out, precision-recall of OOD on -s: (1, 2/3) at -s>=-3, (.5, .5) at -s>=-2, (.5, 1) at -s>=-1, (0, 1).
    assert m['AUPR_OUT'] == pytest.approx(100 * (0.5 * (2 / 3 + 0.5) / 2 + 0.5))


def test_metrics_with_ties():
    # ID 1, 1; OOD 1, 0. AUROC: ties count half -> (.5 + 1 + .5 + 1) / 4 = 75%.
    # Catching 95% of OOD needs the tied threshold, which rejects all ID: FPR@95 = 100%.
    m = evaluate.ood_metrics(np.array([1.0, 1.0]), np.array([1.0, 0.0]))
    assert m['AUROC'] == pytest.approx(75.0) and m['FPR95'] == pytest.approx(100.0)
    # accepting 95% of ID needs s >= 1, which accepts the tied OOD sample: 50%
    assert m['FPR95_ID'] == pytest.approx(50.0)


@pytest.fixture(scope='session')
def evaluated(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp('eval')
    evaluate.main([str(runs / 'ce_s0'), '--cache', str(out / 'cache'), '--out', str(out / 'cached1'), '--plots', str(out / 'plots')])
    return out


def test_evaluate_writes_every_output(evaluated):
    results = json.loads((evaluated / 'cached1' / 'results.json').read_text())
    assert set(evaluate.DETECTORS) <= set(results)
    for det in evaluate.DETECTORS:
        assert set(results[det]) == {'digits6-9', 'china', 'flower', 'near', 'far'}
        for metric in evaluate.METRICS:
            assert 0 <= results[det]['near'][metric] <= 100 and f'{metric}_std' in results[det]['near']
    assert results['ebo']['far']['AUROC'] > 60 and results['msp']['near']['ACC'] > 85
    scores = np.load(evaluated / 'cached1' / 'scores.npz')
    assert 'ce_s0/knn/id' in scores and 'ce_s0/odin/flower' in scores
    assert (evaluated / 'cached1' / 'results.csv').read_text().startswith('setting,detector,dataset,FPR95')
    assert '### summary' in (evaluated / 'cached1' / 'results.md').read_text()
    assert {p.name for p in (evaluated / 'plots').glob('*.png')} == {f'{d}.png' for d in evaluate.DETECTORS}
    for split in ('train', 'val', 'id', 'digits6-9', 'china', 'flower'):
        cached = np.load(evaluated / 'cache' / 'ce_s0' / f'{split}.npz')
        assert cached['logits'].shape[1] == 6 and cached['features'].shape[1] == 128


def test_detectors_match_their_formulas(runs, evaluated):
    """Each detector's score recomputed from the cached logits/features with numpy, from OpenOOD's definitions."""
    cache = {s: np.load(evaluated / 'cache' / 'ce_s0' / f'{s}.npz') for s in ('train', 'val', 'id')}
    scores = np.load(evaluated / 'cached1' / 'scores.npz')
    ckpt = torch.load(runs / 'ce_s0' / 'best.pt', weights_only=False)
    W, b = ckpt['model']['fc.weight'].double().numpy(), ckpt['model']['fc.bias'].double().numpy()
    z, h = cache['id']['logits'].astype(np.float64), cache['id']['features'].astype(np.float64)
    h_tr, y_tr = cache['train']['features'].astype(np.float64), cache['train']['labels']
    h_val, z_val = cache['val']['features'].astype(np.float64), cache['val']['logits'].astype(np.float64)

    def softmax(a):
        e = np.exp(a - a.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def lse(a):
        return np.log(np.exp(a - a.max(1, keepdims=True)).sum(1)) + a.max(1)
    p = softmax(z)
    expected = {'msp': p.max(1), 'mls': z.max(1), 'ebo': lse(z)}
    top = np.sort(p, 1)[:, -6:]
    expected['gen'] = -(top ** 0.1 * (1 - top) ** 0.1).sum(1)
    pred_val = z_val.argmax(1)
    means = np.stack([softmax(z_val)[pred_val == c].mean(0) for c in range(6) if (pred_val == c).any()])
    expected['klm'] = -np.array([min((pi * np.log(pi / m)).sum() for m in means) for pi in p])
    clip = np.quantile(h_val, 0.9)
    expected['react'] = lse(np.minimum(h, clip) @ W.T + b)
    k = 128 - round(128 * 0.9)
    ash = np.zeros_like(h)
    for i, row in enumerate(h):
        ash[i, np.argsort(-row)[:k]] = row.sum() / k
    expected['ash'] = lse(ash @ W.T + b)
    contrib = h_tr.mean(0)[None] * W
    expected['dice'] = lse(h @ (W * (contrib > np.quantile(contrib, 0.9))).T + b)
    mu = np.stack([h_tr[y_tr == c].mean(0) for c in range(6)])
    cov = np.cov((h_tr - mu[y_tr]).T, bias=True)
    prec = np.linalg.pinv(cov)
    md = np.stack([np.einsum('nd,de,ne->n', h - m, prec, h - m) for m in mu], 1)
    expected['mds'] = -md.min(1)
    mu0 = h_tr.mean(0)
    prec0 = np.linalg.pinv(np.cov(h_tr.T, bias=True))
    expected['rmds'] = (-md).max(1) + np.einsum('nd,de,ne->n', h - mu0, prec0, h - mu0)
    bank = h_tr / np.linalg.norm(h_tr, axis=1, keepdims=True)
    q = h / np.linalg.norm(h, axis=1, keepdims=True)
    expected['knn'] = -np.sort(np.linalg.norm(q[:, None] - bank[None], axis=2), 1)[:, 49]
    u = -np.linalg.pinv(W) @ b
    eigval, eigvec = np.linalg.eigh(np.cov((h_tr - u).T, bias=True) + np.outer(h_tr.mean(0) - u, h_tr.mean(0) - u))
    ns = eigvec[:, np.argsort(-eigval)[64:]]
    z_tr = h_tr @ W.T + b
    alpha = z_tr.max(1).mean() / np.linalg.norm((h_tr - u) @ ns, axis=1).mean()
    expected['vim'] = lse(z) - alpha * np.linalg.norm((h - u) @ ns, axis=1)
    for det, value in expected.items():
        np.testing.assert_allclose(scores[f'ce_s0/{det}/id'], value, rtol=1e-4, atol=1e-4, err_msg=det)


def test_tempscale_and_odin(runs, evaluated):
    cache = {s: np.load(evaluated / 'cache' / 'ce_s0' / f'{s}.npz') for s in ('train', 'val', 'id')}
    scores = np.load(evaluated / 'cached1' / 'scores.npz')
    args = evaluate.get_args(['x'])
    as_tensors = lambda npz: {k: torch.from_numpy(npz[k]).long() if k == 'labels' else torch.from_numpy(npz[k]).double() for k in ('logits', 'features', 'labels')}
    val, train = as_tensors(cache['val']), as_tensors(cache['train'])
    ckpt = torch.load(runs / 'ce_s0' / 'best.pt', weights_only=False)
    W, b = ckpt['model']['fc.weight'].double(), ckpt['model']['fc.bias'].double()
    T = evaluate.fit(train, val, W, b, args)['temperature']
    nll = lambda t: F.cross_entropy(val['logits'] / t, val['labels']).item()
    assert nll(T) < nll(1.5)  # the fit improved on its start
    np.testing.assert_allclose(scores['ce_s0/tempscale/id'], F.softmax(torch.from_numpy(cache['id']['logits']).double() / T, 1).max(1).values.numpy(), rtol=1e-5)
    # ODIN on three ID images, by hand: perturb by eps/std against the gradient sign, softmax at T=1000
    ds = train_sio.load_dataset('digits')
    model = train_sio.Net('cnn', 6)
    model.load_state_dict(ckpt['model'])
    model.eval()
    mean, std = torch.tensor(ckpt['mean']).view(1, 3, 1, 1), torch.tensor(ckpt['std']).view(1, 3, 1, 1)
    x = ((torch.from_numpy(ds['test'][0][:3]).permute(0, 3, 1, 2).float() / 255 - mean) / std).requires_grad_(True)
    out = model(x)
    F.cross_entropy(out / 1000, out.argmax(1)).backward()
    sign = torch.where(x.grad >= 0, 1.0, -1.0)
    with torch.no_grad():
        odin = F.softmax(model(x - 0.0014 * sign / std) / 1000, 1).max(1).values
    np.testing.assert_allclose(scores['ce_s0/odin/id'][:3], odin.numpy(), rtol=1e-5)


def test_cached_and_uncached_tables_match(runs, evaluated):
    evaluate.main([str(runs / 'ce_s0'), '--cache', str(evaluated / 'cache'), '--out', str(evaluated / 'cached2')])
    evaluate.main([str(runs / 'ce_s0'), '--out', str(evaluated / 'uncached')])
    tables = [json.loads((evaluated / d / 'results.json').read_text()) for d in ('cached1', 'cached2', 'uncached')]
    assert tables[0] == tables[1] == tables[2]


def test_a_damaged_cache_file_is_computed_again(runs, evaluated, tmp_path, capsys):
    import shutil
    shutil.copytree(evaluated / 'cache', tmp_path / 'cache')
    (tmp_path / 'cache' / 'ce_s0' / 'val.npz').write_bytes(b'PK\x03\x04 cut short')
    evaluate.main([str(runs / 'ce_s0'), '--cache', str(tmp_path / 'cache'), '--out', str(tmp_path / 'res')])
    assert 'val.npz is unreadable' in capsys.readouterr().err
    assert json.loads((tmp_path / 'res' / 'results.json').read_text()) == json.loads((evaluated / 'cached1' / 'results.json').read_text())
    with np.load(tmp_path / 'cache' / 'ce_s0' / 'val.npz') as rewritten:
        assert len(rewritten['labels']) > 0


def test_mean_and_std_over_runs(runs, tmp_path):
    cache = str(tmp_path / 'cache')
    evaluate.main([str(runs / 'ce_s0'), str(runs / 'ce_s1'), '--detectors', 'ebo,knn', '--cache', cache, '--out', str(tmp_path / 'both')])
    single = [evaluate.main([str(runs / r), '--detectors', 'ebo,knn', '--cache', cache, '--out', str(tmp_path / r)]) or
              json.loads((tmp_path / r / 'results.json').read_text()) for r in ('ce_s0', 'ce_s1')]
    both = json.loads((tmp_path / 'both' / 'results.json').read_text())
    for det in ('ebo', 'knn'):
        for row in ('flower', 'near', 'far'):
            values = [s[det][row]['AUROC'] for s in single]
            assert both[det][row]['AUROC'] == pytest.approx(np.mean(values))
            assert both[det][row]['AUROC_std'] == pytest.approx(np.std(values))
    assert set(np.load(tmp_path / 'both' / 'scores.npz').files) >= {'ce_s0/ebo/id', 'ce_s1/knn/china'}


def test_evaluate_errors(runs, tmp_path, capsys):
    ckpt = torch.load(runs / 'ce_s0' / 'best.pt', weights_only=False)
    ckpt.update(model=train_sio.Net('cnn', 10).state_dict(), num_classes=10, classes=[str(i) for i in range(10)])
    torch.save(ckpt, tmp_path / 'ten.pt')
    error = main_error(capsys, evaluate.main, tmp_path / 'ten.pt', '--detectors', 'msp')
    assert '10 classes' in error and '6' in error
    (tmp_path / 'notes.pt').write_text('not a checkpoint')
    assert_user_error(run_script('evaluate.py', tmp_path / 'notes.pt'), 'cannot be read')  # once as a user runs it
    torch.save({'weights': 1}, tmp_path / 'dict.pt')
    assert 'not a synth-ood checkpoint' in main_error(capsys, evaluate.main, tmp_path / 'dict.pt')
    error = main_error(capsys, evaluate.main, runs / 'ce_s0', '--detectors', 'msp', '--far', f'extra={tmp_path}/none')
    assert 'extra' in error and f'--far extra={tmp_path}/none does not exist' in error  # a folder named by hand must be there


def test_a_checkpoint_with_tensor_statistics_scores_as_with_floats(runs, tmp_path):
    """mean/std saved as tensors (a checkpoint written by hand) are read as the floats our runs save."""
    ckpt = torch.load(runs / 'ce_s0' / 'best.pt', weights_only=False)
    (tmp_path / 'ck').mkdir()
    torch.save(dict(ckpt, mean=torch.tensor(ckpt['mean']), std=torch.tensor(ckpt['std'])), tmp_path / 'ck' / 'tensors.pt')
    torch.save(ckpt, tmp_path / 'ck' / 'floats.pt')
    for name in ('tensors', 'floats'):
        evaluate.main([str(tmp_path / 'ck' / f'{name}.pt'), '--detectors', 'msp', '--out', str(tmp_path / f'eval_{name}')])
    results = [json.loads((tmp_path / f'eval_{n}' / 'results.json').read_text()) for n in ('tensors', 'floats')]
    assert results[0]['msp'] == results[1]['msp'] and results[0]['msp']['near']['AUROC'] > 50


def test_scoring_is_float32_by_default_and_bf16_on_request(runs, evaluated, tmp_path):
    """fp32 outputs equal a plain float32 forward; --bf16 is keyed apart in the cache and moves the outputs a little."""
    import shutil
    shutil.copytree(evaluated / 'cache', tmp_path / 'cache')
    fp32 = np.load(evaluated / 'cache' / 'ce_s0' / 'id.npz')
    assert str(fp32['source']).endswith(':fp32')
    ckpt = torch.load(runs / 'ce_s0' / 'best.pt', weights_only=False)
    model = evaluate.build_model(ckpt, torch.device('cpu'))
    x = torch.from_numpy(train_sio.load_dataset('digits')['test'][0]).permute(0, 3, 1, 2)
    with torch.no_grad():
        z, h = model(evaluate.normalize(x, ckpt['mean'], ckpt['std'], ckpt['image_size']), features=True)
    np.testing.assert_allclose(fp32['features'], h.numpy(), rtol=1e-5, atol=1e-5)
    evaluate.main([str(runs / 'ce_s0'), '--bf16', '--detectors', 'msp,ebo,knn', '--cache', str(tmp_path / 'cache'), '--out', str(tmp_path / 'bf16')])
    bf16 = np.load(tmp_path / 'cache' / 'ce_s0' / 'id.npz')
    assert str(bf16['source']).endswith(':bf16')  # recomputed, not read from the fp32 cache
    assert not np.array_equal(bf16['logits'], fp32['logits'])
    assert np.abs(bf16['logits'] - fp32['logits']).max() < 0.1 * np.abs(fp32['logits']).max()
    shifted, exact = (json.loads((d / 'results.json').read_text()) for d in (tmp_path / 'bf16', evaluated / 'cached1'))
    for det in ('msp', 'ebo', 'knn'):
        assert abs(shifted[det]['far']['AUROC'] - exact[det]['far']['AUROC']) < 5


def test_knn_in_blocks_equals_one_block():
    rng = np.random.RandomState(0)
    h, bank = torch.from_numpy(rng.rand(300, 32)), torch.from_numpy(rng.rand(1000, 32).astype(np.float32))
    one_block = evaluate.knn_score(h, bank, 50, block=10 ** 9)
    blocked = evaluate.knn_score(h, bank, 50, block=600)  # 12 queries x 50 bank rows per block
    np.testing.assert_allclose(blocked.numpy(), one_block.numpy(), rtol=0, atol=1e-6)
    q, nb = h.numpy() / np.linalg.norm(h.numpy(), axis=1, keepdims=True), bank.numpy() / np.linalg.norm(bank.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(blocked.numpy(), -np.sort(np.linalg.norm(q[:, None] - nb[None], axis=2), 1)[:, 49], atol=1e-5)


def test_fit_computes_only_what_the_detectors_need(monkeypatch):
    rng = np.random.RandomState(0)
    y = torch.from_numpy(rng.randint(0, 4, 500))
    h = (torch.from_numpy(rng.randn(500, 16)).float() + 100 + 5 * y[:, None]).relu()  # a large mean, to test the shifted sums
    z = h @ torch.ones(16, 4) / 16
    train = val = dict(features=h, logits=z, labels=y)
    W, b = torch.from_numpy(rng.randn(4, 16)), torch.zeros(4, dtype=torch.float64)
    args = lambda dets, **kw: argparse.Namespace(**dict(vars(evaluate.get_args(['x'])), detectors=dets, **kw))
    assert set(evaluate.fit(train, val, W, b, args(['msp', 'ebo', 'knn']))) == {'W', 'b', 'knn_bank'}
    monkeypatch.setattr(torch.linalg, 'eigh', lambda *a: pytest.fail('ViM was fitted though not asked for'))
    assert set(evaluate.fit(train, val, W, b, args(['mds']))) == {'W', 'b', 'mds_means', 'mds_prec'}
    monkeypatch.undo()
    # the chunked float64 moments equal numpy's on the whole array
    mean, class_means, counts, scatter = evaluate.train_moments(h, y, 4, rows=7)
    hn = h.double().numpy()
    np.testing.assert_allclose(mean.numpy(), hn.mean(0), rtol=1e-12)
    np.testing.assert_allclose(class_means.numpy(), np.stack([hn[y.numpy() == c].mean(0) for c in range(4)]), rtol=1e-12)
    np.testing.assert_allclose(scatter.numpy() / 500, np.cov(hn.T, bias=True), rtol=1e-9, atol=1e-9)
    with pytest.raises(SystemExit) as stop:
        evaluate.fit(train, val, W, b, args(['vim'], vim_dim=16))
    assert stop.value.code == 2


def test_bench_features_times_every_detector(capsys):
    from bench import bench_detectors
    bench_detectors.main(['2000,64,10,300'])
    out = capsys.readouterr().out
    assert 'train 2,000 x 64' in out
    for det in evaluate.DETECTORS:
        assert (f'| {det} |' in out) == (det != 'odin'), det


def test_folder_ood_set_and_cifar_missing_sets(runs, tmp_path):
    from PIL import Image
    (tmp_path / 'noise').mkdir()
    for i in range(20):
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / 'noise' / f'{i}.png')
    evaluate.main([str(runs / 'ce_s0'), '--detectors', 'msp', '--far', f'noise={tmp_path / "noise"}', '--out', str(tmp_path / 'o')])
    results = json.loads((tmp_path / 'o' / 'results.json').read_text())
    assert 'noise' in results['msp'] and results['_meta']['far'] == ['china', 'flower', 'noise']

def test_fpr95_takes_the_first_threshold_catching_95_percent_of_ood():
    # 100 OOD scores -1 .. -100 and ID scores -6.5, 10, 11, 12. Rejecting from the lowest score up, the 94
    # OOD scores -100 .. -7 are caught before any ID one (FPR 0 at TPR 0.94); the 95th OOD score, -6, is
    # caught only with the ID score -6.5 below it: FPR@95 = 1 of 4 ID = 25% (at 0.94 it would be 0%).
    ood, id_ = -np.arange(1.0, 101.0), np.array([-6.5, 10.0, 11.0, 12.0])
    m = evaluate.ood_metrics(id_, ood)
    assert m['FPR95'] == pytest.approx(25.0)
    # FPR95(ID+): accepting 95% of ID (4 of 4, s >= -6.5) accepts the 6 OOD scores -1 .. -6: 6%
    assert m['FPR95_ID'] == pytest.approx(6.0)
    # AUPR-In by the trapezoid rule over (recall, precision) of ID on s: 3 ID above all OOD give (.75, 1)
    # (and (.25, 1), (.5, 1) before it); then the OOD scores -1 .. -6 add precision 3/4 .. 3/9 at recall
    # .75; -6.5 gives (1, 4/10); the rest (1, 4/104). Trapezoids: .75 * 1 (from recall 0) + .25 * (4/10 + 3/9) / 2.
    trapezoid = 0.75 * 1 + 0.25 * (4 / 10 + 3 / 9) / 2
    average_precision = 0.75 * 1 + 0.25 * 4 / 10  # sklearn's step rule, which OpenOOD does not use
    assert m["AUPR_IN"] == pytest.approx(100 * trapezoid) and abs(trapezoid - average_precision) > 0.005


def test_a_detector_that_ranks_nothing_is_said_and_each_detector_is_scored_once(runs, capsys):
    assert evaluate.get_args(['x', '--detectors', 'msp,gen,msp']).detectors == ['msp', 'gen']
    evaluate.main([str(runs / 'ce_s0'), '--detectors', 'msp,gen', '--gen-gamma', '1e30'])  # p^g (1-p)^g = 0 for all
    err = capsys.readouterr().err
    assert 'gen gives every image the same score' in err and 'msp gives' not in err


def test_aps_openood_grids_order_and_ties():
    """--aps openood: v1.5's grids in its generation order (the last key outermost), the first of equal AUROCs
    kept; sio / val keep the SIO code's order and the last of equals."""
    args = evaluate.get_args(['x'])
    for mode, order, kept in (('openood', [(1.0, 0.0014), (10.0, 0.0014), (100.0, 0.0014), (1000.0, 0.0014),
                                           (1.0, 0.0028), (10.0, 0.0028), (100.0, 0.0028), (1000.0, 0.0028)], (1.0, 0.0014)),
                              ('val', [(t, e) for t in (1.0, 10.0, 100.0, 1000.0) for e in (0.0014, 0.0028)], (1000.0, 0.0028))):
        args.aps, tried = mode, []
        a, record = evaluate.aps_search('odin', args, lambda a: tried.append((a.odin_temperature, a.odin_eps)) or np.r_[1.0, 2.0],
                                        lambda a: np.r_[0.0, 1.5], math.inf)  # every setting: AUROC 75
        assert tried == order and (a.odin_temperature, a.odin_eps) == kept and record['val_auroc'] == 75.0, mode
    args.aps = 'openood'  # the K a train set of 600 rows allows; the best AUROC wins
    tried = []
    a, record = evaluate.aps_search('knn', args, lambda a: tried.append(a.knn_k) or np.r_[float(a.knn_k == 200)],
                                    lambda a: np.r_[0.5], 600)
    assert tried == [50, 100, 200, 500] and a.knn_k == 200 and record == dict(knn_k=200, val_auroc=100.0)
    assert [g for g in evaluate.APS_OPENOOD['ash']['ash_percentile']] == [65, 70, 75, 80, 85, 90, 95]
    assert evaluate.APS_OPENOOD['react'] == {'react_percentile': [85, 90, 95, 99]}
    assert evaluate.APS_OPENOOD['vim'] == {'vim_dim': [256, 1000]} and evaluate.APS_OPENOOD['ebo'] == evaluate.APS_GRIDS['ebo']


def test_aps_openood_end_to_end_on_digits(runs, tmp_path):
    from PIL import Image
    (tmp_path / 'val_ood').mkdir()
    for i in range(30):
        Image.fromarray(np.random.RandomState(i).randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / 'val_ood' / f'{i}.png')
    evaluate.main([str(runs / 'ce_s0'), '--detectors', 'ebo,react,ash,knn,vim', '--aps', 'openood', '--aps-ood', str(tmp_path / 'val_ood'),
                   '--cache', str(tmp_path / 'cache'), '--out', str(tmp_path / 'res')])
    picks = json.loads((tmp_path / 'res' / 'results.json').read_text())['_meta']['aps']['picks']['ce_s0']
    assert set(picks) == {'ebo', 'react', 'ash', 'knn', 'vim'} and picks['vim']['vim_dim'] == 256  # v1.5: the first, all tie
    assert picks['react']['react_percentile'] in (85, 90, 95, 99) and picks['knn']['knn_k'] in (50, 100, 200, 500)  # 1000 > 646 rows
    cache = {split: np.load(tmp_path / 'cache' / 'ce_s0' / f'{split}.npz') for split in ('val', 'aps_ood', 'id')}
    clip = lambda p: np.percentile(cache['val']['features'], p)
    react = lambda split, p: torch.logsumexp(torch.from_numpy(np.minimum(cache[split]['features'], clip(p)).astype(np.float64)) @
                                             torch.load(runs / 'ce_s0' / 'best.pt', weights_only=False)['model']['fc.weight'].double().T
                                             + torch.load(runs / 'ce_s0' / 'best.pt', weights_only=False)['model']['fc.bias'].double(), 1).numpy()
    aurocs = {p: evaluate.ood_metrics(react('val', p), react('aps_ood', p))['AUROC'] for p in (85, 90, 95, 99)}
    assert picks['react']['react_percentile'] == [p for p in aurocs if aurocs[p] == max(aurocs.values())][0], aurocs


class OpenOODBlock(torch.nn.Module):
    """OpenOOD's BasicBlock as described: conv-bn-relu-conv-bn, plus a shortcut (empty, or a 1x1 conv and a bn
    where the stride or width changes), then relu."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class OpenOODResNet18(torch.nn.Module):
    """OpenOOD's ResNet18_32x32 as described: a 3x3 stride-1 stem without max-pool, four stages of two blocks
    (64, 128, 256, 512 wide), global average pooling, fc; forward -> (logits, the 512-d pooled feature)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(64)
        for i, (c_in, c_out, stride) in enumerate([(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)], 1):
            setattr(self, f'layer{i}', torch.nn.Sequential(OpenOODBlock(c_in, c_out, stride), OpenOODBlock(c_out, c_out, 1)))
        self.fc = torch.nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(1, 5):
            x = getattr(self, f'layer{i}')(x)
        h = x.mean((2, 3))
        return self.fc(h), h


def randomized(model, seed):
    """Random weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    return model.eval()


def torchvision_forward(model, x):
    h = torch.nn.Sequential(*list(model.children())[:-1])(x).flatten(1)
    return model.fc(h), h


def test_openood_and_torchvision_checkpoints_load_strictly(tmp_path, monkeypatch, capsys):
    import torchvision
    cases = [('resnet18', OpenOODResNet18(10), lambda m, x: m(x), 32, 10),
             ('resnet18_224', torchvision.models.resnet18(num_classes=200), torchvision_forward, 64, 200),
             ('resnet50', torchvision.models.resnet50(), torchvision_forward, 64, 1000)]
    for seed, (arch, reference, forward, size, classes) in enumerate(cases):
        randomized(reference, seed)
        state = reference.state_dict()
        assert arch != 'resnet18' or (len(state) == 122 and 'layer2.0.shortcut.0.weight' in state and 'layer1.0.shortcut.0.weight' not in state)
        (tmp_path / arch / 's3').mkdir(parents=True)
        torch.save(state, tmp_path / arch / 's3' / 'best.ckpt')
        [run] = evaluate.load_runs(f'openood:{tmp_path / arch / "s3" / "best.ckpt"}', evaluate.get_args(['x', '--dataset', 'cifar10']))
        assert (run['arch'], run['num_classes'], run['name'], run['image_size']) == (arch, classes, f'{arch}_s3', 32 if arch == 'resnet18' else 224)
        model = evaluate.build_model(run, torch.device('cpu'))  # load_state_dict(strict=True); channels_last
        x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():  # the reference in the same memory format: the same convolution kernels
            (z, h), (z_ref, h_ref) = model(x, features=True), forward(reference.to(memory_format=torch.channels_last), x)
        torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    # torchvision:resnet50 through torchvision's own loading: its hub cache holds the file, so nothing is fetched
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.save(state, tmp_path / 'hub' / 'checkpoints' / 'resnet50-0676ba61.pth')
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    [run] = evaluate.load_runs('torchvision:resnet50', evaluate.get_args(['x']))
    assert run['arch'] == 'resnet50' and run['dataset'] == 'imagenet' and run['name'] == 'torchvision_resnet50'
    assert all(torch.equal(run['model'][f'body.{k}' if not k.startswith('fc.') else k], v) for k, v in state.items())
    import urllib.error
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'empty_hub'))  # offline, nothing cached: one line

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    error = main_error(capsys, evaluate.main, 'torchvision:resnet50', '--dataset', 'imagenet', '--openood-root', tmp_path)
    assert f'{tmp_path / "empty_hub" / "checkpoints" / "resnet50-0676ba61.pth"}' in error and 'download' in error
    state['fc.weight'] = state['fc.weight'][:, :100]  # a head that fits no ResNet: named in the one line
    torch.save(state, tmp_path / 'odd.ckpt')
    error = main_error(capsys, evaluate.main, f'openood:{tmp_path / "odd.ckpt"}', '--dataset', 'imagenet', '--openood-root', tmp_path)
    assert 'fits none' in error and 'conv1.weight' in error and '(1000, 100)' in error


def openood_tree(root, dataset, lists, seed=0):
    """OpenOOD v1.5's layout: benchmark_imglist/<dataset>/<list>.txt, one '<set folder>/<file> <label>' per line,
    the JPEGs under images_classic/ (CIFAR, Textures) or images_largescale/. lists: name -> (folder, count, shape)."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    (root / 'benchmark_imglist' / dataset).mkdir(parents=True)
    for name, (folder, count, shape) in lists.items():
        images = root / ('images_classic' if dataset.startswith('cifar') or folder == 'texture' else 'images_largescale')
        labels = BENCH_CLASSES[dataset] if name.split('_', 1)[1] == dataset else None
        lines = []
        for i in range(count):
            (images / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8)).save(images / folder / f'{name}_{i}.jpg')
            lines.append(f'{folder}/{name}_{i}.jpg {i % labels if labels else -1}')
        (root / 'benchmark_imglist' / dataset / f'{name}.txt').write_text('\n'.join(lines) + '\n')


BENCH_CLASSES = dict(cifar10=10, imagenet200=200, imagenet=1000)


def test_openood_trees_score_two_seeds_on_its_lists(tmp_path, capsys):
    """Stand-in OpenOOD trees (a few JPEGs per list) for CIFAR-10, ImageNet-200 and ImageNet-1K, each scored with
    two random seeds of its network through openood:DIR: its sets by their names, counted from its lists."""
    import torchvision
    odd = (37, 45, 3)  # read through Resize + CenterCrop at any size
    openood_tree(tmp_path / 'data', 'cifar10', dict(
        train_cifar10=('cifar10/train', 60, (32, 32, 3)), val_cifar10=('cifar10/test', 10, (32, 32, 3)),
        test_cifar10=('cifar10/test', 12, (32, 32, 3)), val_tin=('tin/val', 6, (64, 64, 3)),
        test_cifar100=('cifar100/test', 5, (32, 32, 3)), test_tin=('tin/test', 5, (64, 64, 3)), test_mnist=('mnist/test', 5, (28, 28)),
        test_svhn=('svhn/test', 5, (32, 32, 3)), test_texture=('texture/images', 4, odd), test_places365=('places365/val', 4, (256, 256, 3))))
    for dataset in ('imagenet200', 'imagenet'):
        openood_tree(tmp_path / 'data', dataset, {f'val_{dataset}': ('imagenet_1k/val', 2, odd), f'test_{dataset}': ('imagenet_1k/val', 3, (300, 260, 3)),
                                                  **{f'test_{name}': (name, 2, odd) for name in ('ssb_hard', 'ninco', 'inaturalist', 'openimage_o')},
                                                  'test_textures': ('texture', 2, odd), 'val_openimage_o': ('openimage_o', 2, odd)}, seed=1)
    expected = dict(cifar10=(dict(cifar100=5, tin=5), dict(mnist=5, svhn=5, texture=4, places365=4), 12),
                    imagenet200=(dict(ssb_hard=2, ninco=2), dict(inaturalist=2, textures=2, openimage_o=2), 3))
    expected['imagenet'] = expected['imagenet200']
    for dataset, net, extra in (('cifar10', lambda: OpenOODResNet18(10), ['--detectors', 'msp,ebo,knn,vim', '--aps', 'openood', '--workers', '2', '--batch-size', '8']),
                                ('imagenet200', lambda: torchvision.models.resnet18(num_classes=200), ['--detectors', 'msp,ebo']),
                                ('imagenet', lambda: torchvision.models.resnet18(num_classes=1000), ['--detectors', 'msp'])):
        seeds = tmp_path / f'{dataset}_resnet18_base_default'
        for seed in (0, 1):
            (seeds / f's{seed}').mkdir(parents=True)
            torch.save(randomized(net(), seed).state_dict(), seeds / f's{seed}' / 'best.ckpt')
        out = tmp_path / f'eval_{dataset}'
        evaluate.main([f'openood:{seeds}', '--dataset', dataset, '--openood-root', str(tmp_path / 'data'), '--out', str(out)] + extra)
        results = json.loads((out / 'results.json').read_text())
        near, far, id_count = expected[dataset]
        assert results['_meta']['runs'] == {'': [f'{seeds.name}_s0', f'{seeds.name}_s1']}
        assert results['_meta']['near'] == list(near) and results['_meta']['far'] == list(far)
        with np.load(out / 'scores.npz') as scores:
            assert {name: len(scores[f'{seeds.name}_s1/msp/{name}']) for name in {**near, **far}} == {**near, **far}
            assert len(scores[f'{seeds.name}_s0/msp/id']) == id_count
    picks = json.loads((tmp_path / 'eval_cifar10' / 'results.json').read_text())['_meta']['aps']
    assert picks['ood'] == 'val_tin (OpenOOD list)' and picks['picks']['cifar10_resnet18_base_default_s0']['knn']['knn_k'] == 50
    assert 'images_largescale/imagenet_1k' not in capsys.readouterr().err  # ImageNet's train list is not needed by msp / ebo


def test_odd_image_files_in_an_ood_folder_are_read(runs, tmp_path):
    """Palette, alpha, 16-bit grey, CMYK, 1x1 and 1x500 images beside a text file: read as torchvision's loader
    reads them, resized and cropped like any other image."""
    from PIL import Image
    rng = np.random.RandomState(0)
    (tmp_path / 'odd').mkdir()
    Image.fromarray(rng.randint(0, 256, (20, 30, 3), dtype=np.uint8)).convert('P').save(tmp_path / 'odd' / 'palette.png')
    Image.fromarray(rng.randint(0, 256, (20, 30, 4), dtype=np.uint8), 'RGBA').save(tmp_path / 'odd' / 'alpha.png')
    Image.fromarray(rng.randint(0, 65535, (20, 30)).astype(np.uint16)).save(tmp_path / 'odd' / 'grey16.png')
    Image.fromarray(rng.randint(0, 256, (20, 30, 3), dtype=np.uint8)).convert('CMYK').save(tmp_path / 'odd' / 'cmyk.jpg')
    Image.fromarray(rng.randint(0, 256, (1, 1, 3), dtype=np.uint8)).save(tmp_path / 'odd' / 'one.png')
    Image.fromarray(rng.randint(0, 256, (1, 500, 3), dtype=np.uint8)).save(tmp_path / 'odd' / 'line.png')
    (tmp_path / 'odd' / 'notes.txt').write_text('not an image')
    evaluate.main([str(runs / 'ce_s0'), '--detectors', 'msp', '--far', f'odd={tmp_path / "odd"}', '--out', str(tmp_path / 'res')])
    with np.load(tmp_path / 'res' / 'scores.npz') as scores:
        assert len(scores['ce_s0/msp/odd']) == 6 and np.isfinite(scores['ce_s0/msp/odd']).all()
    assert evaluate.read_batch([(str(tmp_path / 'odd' / 'line.png'), 8, 8)]).shape == (1, 3, 8, 8)

def test_pil_resize_and_crop_match_torchvision_on_odd_sizes():
    import torchvision.transforms as T
    from PIL import Image
    rng = np.random.RandomState(0)
    for h, w in [(375, 500), (500, 333), (37, 45), (45, 37), (31, 29), (257, 256), (224, 301), (64, 64), (28, 28), (32, 32), (33, 97)]:
        image = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
        for pre_size, size in ((256, 224), (32, 32), (18, 16)):
            expected = np.asarray(T.CenterCrop(size)(T.Resize(pre_size, T.InterpolationMode.BILINEAR)(Image.fromarray(image))))
            assert np.array_equal(evaluate.resize_crop(image, pre_size, size), expected), (h, w, pre_size, size)
    grey = rng.randint(0, 256, (4, 28, 28), dtype=np.uint8)  # MNIST's arrays: grey, on 3 channels
    assert np.array_equal(evaluate.resize_all(grey, 32, 32)[1], np.asarray(T.Resize(32)(Image.fromarray(grey[1]).convert('RGB'))))


def test_results_continue_only_while_unfinished_and_inputs_are_checked_first(runs, bad, tmp_path, capsys):
    out = tmp_path / 'res'
    evaluate.main([str(runs / 'ce_s0'), '--detectors', 'msp', '--out', str(out), '--plots', str(tmp_path / 'plots'), '--cache', str(tmp_path / 'cache')])
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['complete'] and set(manifest['files']) == {'results.json', 'results.md', 'results.csv', 'scores.npz'}
    cached = sorted(f'ce_s0/{f.name}' for f in (tmp_path / 'cache' / 'ce_s0').iterdir())  # each file by its name
    assert json.loads((tmp_path / 'cache' / 'manifest.json').read_text())['files'] == cached and len(cached) > 3
    assert json.loads((tmp_path / 'plots' / 'manifest.json').read_text())['files'] == ['msp.png']
    error = main_error(capsys, evaluate.main, runs / 'ce_s0', '--detectors', 'msp', '--out', out)
    assert 'the results of an earlier evaluation' in error and '--overwrite' in error
    evaluate.main([str(runs / 'ce_s0'), '--detectors', 'msp,ebo', '--out', str(out), '--overwrite'])
    assert set(json.loads((out / 'results.json').read_text())) == {'msp', 'ebo', '_meta'}
    evaluate.main([str(bad / 'run_unfinished' / 'best.pt'), '--detectors', 'msp'])  # its best.pt is scored as it is
    assert 'ID test' in capsys.readouterr().out


def test_non_finite_outputs_scores_memory_and_interrupts_are_one_line(runs, tmp_path, capsys, monkeypatch):
    ckpt = torch.load(runs / 'ce_s0' / 'best.pt', weights_only=False)
    ckpt['model'] = dict(ckpt['model'], **{'fc.weight': ckpt['model']['fc.weight'] * 1e38})  # finite weights, logits overflow
    torch.save(ckpt, tmp_path / 'huge.pt')
    error = main_error(capsys, evaluate.main, tmp_path / 'huge.pt', '--detectors', 'msp')
    assert 'huge gives non-finite logits or features on val' in error
    monkeypatch.setitem(evaluate.SCORES, 'gen', lambda z, h, s, a: torch.full((len(z),), float('nan')))
    error = main_error(capsys, evaluate.main, runs / 'ce_s0', '--detectors', 'msp,gen')
    assert 'ce_s0: detector gen gives non-finite scores on id' in error and 'leave gen out of --detectors' in error
    monkeypatch.undo()
    real = Path.read_text
    monkeypatch.setattr(Path, 'read_text', lambda self, *a, **k: 'MemAvailable: 1 kB\n' if str(self) == '/proc/meminfo' else real(self, *a, **k))
    error = main_error(capsys, evaluate.main, runs / 'ce_s0', '--detectors', 'knn', '--out', tmp_path / 'never')
    assert 'holding the logits and features of' in error and 'score fewer detectors' in error and not (tmp_path / 'never').exists()
    monkeypatch.undo()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, 'forward_all', interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        evaluate.main([str(runs / 'ce_s0'), '--detectors', 'msp', '--out', str(tmp_path / 'stopped'), '--overwrite'])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 130 and len(err) == 1 and err[0].startswith('interrupted: nothing was written; continue with: python ')
    assert err[0].endswith(f'--out {tmp_path / "stopped"} --overwrite')  # --out is taken last: the command as given



# ================================================================================================
# generate.py

import generate  # noqa: E402  (after the train/evaluate tests that need none of diffusers)


@pytest.fixture(scope='session')
def tiny_pipeline(tmp_path_factory):
    """generate.py fit on digits with a tiny step count: a real SD-layout pipeline saved to disk."""
    out = tmp_path_factory.mktemp('pipe') / 'digits'
    generate.main(['fit', '--dataset', 'digits', '--out', str(out), '--steps', '20', '--vae-steps', '10', '--batch-size', '64',
                   '--check-per-class', '2'])
    return out


def test_fit_makes_a_loadable_stable_diffusion_pipeline(tiny_pipeline):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 8
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer('a photo of a three').input_ids)[-2] == 'three</w>'
    fit_info = json.loads((tiny_pipeline / 'fit.json').read_text())
    assert 0 <= fit_info['agreement'] <= 1 and fit_info['classes'][5] == 'five'
    assert [p.name for p in tiny_pipeline.parent.iterdir()] == ['digits']  # nothing beside it, no temporary folder in it
    assert sorted(p.name for p in tiny_pipeline.iterdir()) == ['.lock', 'fit.json', 'manifest.json', 'model_index.json', 'scheduler',
                                                            'text_encoder', 'tokenizer', 'unet', 'vae']
    assert json.loads((tiny_pipeline / 'manifest.json').read_text())['complete']


def sio_args(pipeline, out, *extra):
    return ['sio', '--pipeline', str(pipeline), '--dataset', 'digits', '--per-class', '3', '--steps', '2', '--batch-size', '4',
            '--out', str(out)] + [str(e) for e in extra]


@pytest.fixture(scope='session')
def sio_samples(tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp('sio') / 'full'
    generate.main(sio_args(tiny_pipeline, out))
    return out


def test_sio_writes_counts_labels_and_formats(sio_samples):
    meta = json.loads((sio_samples / 'meta.json').read_text())
    assert meta['counts'] == [3] * 6 and meta['complete'] and meta['prompt_template'] == 'a photo of a {}'
    assert sorted(p.name for p in sio_samples.iterdir() if p.is_dir()) == [f'{c:03d}' for c in range(6)]
    images, labels = np.load(sio_samples / 'images.npy'), np.load(sio_samples / 'labels.npy')
    assert images.shape == (18, 8, 8, 3) and images.dtype == np.uint8 and list(labels) == [c for c in range(6) for _ in range(3)]
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(sio_samples / '004' / '2.png')), images[4 * 3 + 2])
    read_images, read_labels = train_sio.load_synthetic(sio_samples, 'digits', train_sio.DIGIT_NAMES[:6], 8)  # the trainer accepts it
    assert np.array_equal(read_images, images) and np.array_equal(read_labels, labels)


def test_class_names_for_prompts(sio_samples, tmp_path, capsys):
    wnids = ['n01440764', 'n02085620']
    (tmp_path / 'loc.txt').write_text('n02085620 Chihuahua\nn01440764 tench, Tinca tinca\nn09999999 other\n')  # LOC_synset_mapping.txt lines
    assert generate.class_prompt_names(wnids, 'folder:x', tmp_path / 'loc.txt') == ['tench', 'Chihuahua']
    (tmp_path / 'plain.txt').write_text('goldfish\ngreat_white shark\n')  # one per line, in class order
    assert generate.class_prompt_names(wnids, 'folder:x', tmp_path / 'plain.txt') == ['goldfish', 'great white shark']
    (tmp_path / 'windows.txt').write_bytes(b'\xef\xbb\xbfgoldfish\r\nshark\r\n')  # a BOM and CRLF, as Notepad saves
    assert generate.class_prompt_names(wnids, 'folder:x', tmp_path / 'windows.txt') == ['goldfish', 'shark']
    assert generate.class_prompt_names(['aquarium_fish'], 'cifar100') == ['aquarium fish']
    (tmp_path / 'root').mkdir()  # a mapping file in the folder dataset's root is found without the flag
    (tmp_path / 'root' / 'LOC_synset_mapping.txt').write_text((tmp_path / 'loc.txt').read_text())
    assert generate.class_prompt_names(wnids, f'folder:{tmp_path / "root"}') == ['tench', 'Chihuahua']
    for call, words in ((lambda: generate.class_prompt_names(wnids, 'folder:x'), ('WordNet ids', '--class-names')),
                        (lambda: generate.class_prompt_names(wnids + ['n00000001'], 'folder:x', tmp_path / 'loc.txt'), ('n00000001',)),
                        (lambda: generate.class_prompt_names(wnids + ['c'], 'folder:x', tmp_path / 'plain.txt'), ('2 names for 3 classes',))):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            call()
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
    meta = json.loads((sio_samples / 'meta.json').read_text())  # every class's prompt is recorded
    assert meta['prompts'][:2] == ['a photo of a zero', 'a photo of a one']

def test_sio_interrupted_and_resumed_is_byte_identical(tiny_pipeline, sio_samples, tmp_path, capsys):
    out = tmp_path / 'resumed'
    generate.main(sio_args(tiny_pipeline, out, '--max-batches', '2', '--overwrite'))  # stops after 8 of 18 images
    said = capsys.readouterr().out
    assert '18 images, 0 already done' in said and 'incomplete: continue with python' in said
    assert '--overwrite' not in said.split('incomplete: ')[1] and '--max-batches 2' in said  # it would start afresh
    assert not (out / 'images.npy').exists() and not json.loads((out / 'meta.json').read_text())['complete']
    (out / '005' / '1.png.4242.tmp').write_bytes(b'half-written')  # a kill mid-write leaves only a temp file
    (out / '000' / '0.png').unlink()  # and a batch with a missing file is recomputed whole,
    (out / '001' / '0.png').write_bytes((out / '001' / '0.png').read_bytes()[:30])  # as is one with a damaged file (index 3, batch 0 too)
    generate.main(sio_args(tiny_pipeline, out))
    assert '18 images, 4 already done' in capsys.readouterr().out  # images 4-7 only
    files = sorted(p.relative_to(sio_samples) for p in sio_samples.rglob('*.png'))
    assert files == sorted(p.relative_to(out) for p in out.rglob('*.png'))
    for f in files + [Path('images.npy'), Path('labels.npy')]:
        assert (out / f).read_bytes() == (sio_samples / f).read_bytes(), f


def test_sio_full_disk_is_one_line_and_leaves_no_partial_file(tiny_pipeline, tmp_path, capsys, monkeypatch):
    from PIL import Image

    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b'\x89PNG')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(Image.Image, 'save', full_disk)
    error = main_error(capsys, generate.main, *sio_args(tiny_pipeline, tmp_path / 'full'))
    assert 'could not write' in error and 'No space left' in error
    assert not list((tmp_path / 'full').rglob('*.png*'))

def test_fit_full_disk_is_one_line_and_leaves_no_temporary_folder(tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    def full_disk(self, folder, *args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(StableDiffusionPipeline, 'save_pretrained', full_disk)
    error = main_error(capsys, generate.main, 'fit', '--dataset', 'digits', '--out', tmp_path / 'pipe', '--steps', '1', '--vae-steps', '1')
    assert 'could not write the pipeline' in error and 'No space left' in error
    assert [p.name for p in tmp_path.iterdir()] == ['pipe'] and [p.name for p in (tmp_path / 'pipe').iterdir()] == ['.lock']

def test_sio_two_processes_write_each_index_once(tiny_pipeline, sio_samples, tmp_path):
    codes, logs = two_ranks(generate.main, sio_args(tiny_pipeline, tmp_path / 'ddp'), tmp_path / 'logs')
    assert codes == [0, 0], logs
    written = [int(l.split('wrote ')[1].split()[0]) for l in ''.join(logs).splitlines() if 'wrote' in l and 'sio rank' in l]
    assert sorted(written) == [8, 10] and sum(written) == 18  # batches 0,2,4 on rank 0 (4+4+2), 1,3 on rank 1
    for f in sio_samples.rglob('*.png'):
        assert (tmp_path / 'ddp' / f.relative_to(sio_samples)).read_bytes() == f.read_bytes()


def test_sio_hub_id_offline_is_one_line(tmp_path, capsys):
    line = main_error(capsys, generate.main, 'sio', '--pipeline', 'someone/not-cached-pipeline', '--dataset', 'digits', '--out', tmp_path / 'x')
    assert 'local folder' in line and 'generate.py fit' in line
    # as a user runs it (an error found before diffusers is imported, so the interpreter start-up is all it costs)
    assert_user_error(run_script('generate.py', 'sio', '--dataset', 'digits', '--steps', '0', '--out', tmp_path / 'y'), '--steps')


def brute_force_knn(points, k, select, sigma, draws, keep, seed):
    """The OAL code's k-NN sampler written out with numpy loops, returning (candidates, scores, boundary order)."""
    X = points / np.linalg.norm(points, axis=1, keepdims=True)
    k = min(k, len(X) - 1)
    kth = lambda q: np.sort(((q[:, None, :] - X[None]) ** 2).sum(-1), axis=1)[:, k - 1]
    boundary = X[np.argsort(-kth(X), kind='stable')[:select]]
    eps = torch.randn(draws, X.shape[1], generator=torch.Generator().manual_seed(seed)).numpy()
    candidates = np.concatenate([b + sigma * eps for b in boundary])
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    return candidates, kth(candidates)


def test_knn_sampler_fixed_and_faithful_selection():
    rng = np.random.RandomState(0)
    points = rng.randn(40, 3) * np.array([1.0, 0.3, 0.1]) + np.array([2.0, 0, 0])
    k, select, sigma, draws, keep = 5, 4, 0.2, 30, 2
    candidates, scores = brute_force_knn(points, k, select, sigma, draws, keep, seed=7)
    feats = torch.from_numpy(points).float()
    fixed = generate.knn_outliers(feats, k, select, sigma, draws, keep, 1, 'fixed', torch.Generator().manual_seed(7)).numpy()
    for b in range(select):  # the true two lowest-density (largest k-NN distance) candidates of each boundary point
        best = np.argsort(-scores[b * draws:(b + 1) * draws])[:keep] + b * draws
        np.testing.assert_allclose(np.sort(fixed[b * keep:(b + 1) * keep], 0), np.sort(candidates[best], 0), atol=1e-5)
    faithful = generate.knn_outliers(feats, k, select, sigma, draws, keep, 1, 'faithful', torch.Generator().manual_seed(7)).numpy()
    grid = scores.reshape(draws, select)  # the published view: row r, column b holds candidate r*select + b ...
    for b in range(select):
        rows = np.argsort(-grid[:, b])[:keep]  # ... top rows of column b ...
        np.testing.assert_allclose(np.sort(faithful[b * keep:(b + 1) * keep], 0), np.sort(candidates[b * draws + rows], 0), atol=1e-5)  # ... index b*draws + r
    assert not np.allclose(np.sort(fixed, 0), np.sort(faithful, 0))  # the two modes really differ here


def test_kth_distance_takes_the_kth_nearest_by_either_kernel():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(40, 3, generator=g), torch.randn(100, 3, generator=g)
    squared = ((queries[:, None] - bank[None]) ** 2).sum(-1).numpy()
    for k in (5, 39):  # topk (k a small share of the bank), kthvalue (a large share, as digits' 105 of 106)
        np.testing.assert_allclose(generate.kth_distance(queries, bank, k, chunk=32).numpy(), np.sort(squared, 1)[:, k - 1], rtol=1e-4, atol=1e-5)


def test_token_injection_touches_only_class_tokens(tiny_pipeline):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    table = pipe.text_encoder.get_input_embeddings()
    before = table.weight.detach().clone()
    ids = pipe.tokenizer('A high-quality image of the four', return_tensors='pt').input_ids
    class_ids = pipe.tokenizer('four', add_special_tokens=False).input_ids
    vector = torch.full((before.shape[1],), 3.0)
    plain = table(ids)[0].detach()
    with generate.injected(pipe.text_encoder, class_ids, vector):
        swapped = table(ids)[0].detach()
    changed = (plain != swapped).any(1)
    assert changed.tolist() == [i in class_ids for i in ids[0].tolist()] and changed.sum() == len(class_ids)
    assert torch.equal(swapped[changed][0], vector)
    assert torch.equal(table.weight, before)


@pytest.fixture(scope='session')
def oal_outliers(tiny_pipeline, runs, tmp_path_factory):
    out = tmp_path_factory.mktemp('oal') / 'digits'
    generate.main(['oal', '--pipeline', str(tiny_pipeline), '--teacher', str(runs / 'ce_s0'), '--dataset', 'digits', '--out', str(out),
                   '--iterations', '3', '--samples-per-iteration', '2', '--steps', '2', '--features-per-class', '40', '--knn-k', '10',
                   '--knn-draws', '50', '--boundary', '5', '--repeats', '2'])
    return out


def test_oal_outputs_shapes_and_meta(oal_outliers):
    knn, diff = np.load(oal_outliers / 'knn_outliers.npy'), np.load(oal_outliers / 'diffusion_outliers.npy')
    assert knn.shape == (6, 2 * 5 * 2, 128) and knn.dtype == np.float32  # C, repeats * boundary * keep, teacher dim
    assert diff.shape == (6, 8) and diff.dtype == np.float32  # iterations * samples, latent width
    meta = json.loads((oal_outliers / 'meta.json').read_text())
    assert meta['complete'] and meta['anchor'] == 'pooled' and meta['knn_select'] == 'faithful' and meta['scheduler'] == 'PNDMScheduler'
    assert meta['projection']['shape'] == [128, 32]  # teacher 128-d -> the tiny CLIP's 32-d token space
    np.testing.assert_allclose(np.linalg.norm(knn, axis=2), np.array(meta['anchor_norms'])[:, None].repeat(20, 1), rtol=1e-4)
    assert len(list((oal_outliers / 'images').glob('*.png'))) == 6


def test_oal_batched_calls_match_one_call_per_iteration(tiny_pipeline, runs, oal_outliers, tmp_path):
    """--batch-size 2 = 2 samples per iteration: one pipeline call per iteration, as the paper's loop, bit for bit (that call is
    written out below); the fixture's default 16 ran all 3 iterations in one call and differs only by float rounding."""
    out = tmp_path / 'one_per_call'
    generate.main(['oal', '--pipeline', str(tiny_pipeline), '--teacher', str(runs / 'ce_s0'), '--dataset', 'digits', '--out', str(out),
                   '--iterations', '3', '--samples-per-iteration', '2', '--steps', '2', '--features-per-class', '40', '--knn-k', '10',
                   '--knn-draws', '50', '--boundary', '5', '--repeats', '2', '--batch-size', '2'])
    one = np.load(out / 'diffusion_outliers.npy')
    np.testing.assert_allclose(np.load(oal_outliers / 'diffusion_outliers.npy'), one, atol=1e-4)
    pipe = generate.load_pipeline(str(tiny_pipeline), torch.device('cpu'), 'fp32', 'pndm', 'digits')
    knn, names = torch.from_numpy(np.load(out / 'knn_outliers.npy')), generate.class_prompt_names(generate.DIGIT_NAMES[:6], 'digits')
    i, seed = 1, 42  # iteration 1 under the default seed, drawn as the paper's loop draws it
    rng = np.random.RandomState(seed * 1000 + i)
    c = rng.randint(6)
    vector = knn[c, rng.randint(min(1000, knn.shape[1]))] @ generate.projection(128, 32, seed)
    with generate.injected(pipe.text_encoder, generate.injected_tokens(pipe.tokenizer, names, c, 'published'), vector), torch.no_grad():
        latents = pipe(generate.OAL_PROMPT.format(names[c]), num_images_per_prompt=2, num_inference_steps=2, guidance_scale=7.5,
                       generator=torch.Generator('cpu').manual_seed(seed * 1000 + i), output_type='latent').images
    assert np.array_equal(latents.float().mean(dim=1).mean(dim=1).numpy(), one[2:4])


def test_oal_rerun_reuses_knn_and_finished_iterations(tiny_pipeline, runs, oal_outliers, capsys):
    knn_file = oal_outliers / 'knn_outliers.npy'
    stamp = knn_file.stat().st_mtime_ns
    generate.main(['oal', '--pipeline', str(tiny_pipeline), '--teacher', str(runs / 'ce_s0'), '--dataset', 'digits', '--out', str(oal_outliers),
                   '--iterations', '3', '--samples-per-iteration', '2', '--steps', '2', '--features-per-class', '40', '--knn-k', '10',
                   '--knn-draws', '50', '--boundary', '5', '--repeats', '2'])
    printed = capsys.readouterr().out
    assert knn_file.stat().st_mtime_ns == stamp and 'knn:' not in printed  # same settings: nothing recomputed
    assert 'oal: 0 iterations' in printed and json.loads((oal_outliers / 'meta.json').read_text())['complete']


def gen_oal_args(pipeline, runs, out, *extra):
    """generate.py oal as the oal_outliers fixture runs it, into out."""
    return ['oal', '--pipeline', str(pipeline), '--teacher', str(runs / 'ce_s0'), '--dataset', 'digits', '--out', str(out),
            '--iterations', '3', '--samples-per-iteration', '2', '--steps', '2', '--features-per-class', '40', '--knn-k', '10',
            '--knn-draws', '50', '--boundary', '5', '--repeats', '2'] + [str(e) for e in extra]


def any_pipeline(pipeline, folder):
    """A copy without fit's manifest, read as any pipeline folder (a downloaded one): a stand-in for other datasets."""
    import shutil
    shutil.copytree(pipeline, folder, ignore=shutil.ignore_patterns('manifest.json', '.lock'))
    return folder


def fit_args(out, *extra):
    return ['fit', '--dataset', 'digits', '--out', str(out), '--steps', '1', '--vae-steps', '1', '--check-per-class', '1'] + [str(e) for e in extra]


def test_oal_two_processes_share_the_calls_and_leave_together_on_an_error(tiny_pipeline, runs, oal_outliers, tmp_path):
    (tmp_path / 'user').mkdir()
    (tmp_path / 'user' / 'notes.txt').write_text('mine')
    codes, logs = two_ranks(generate.main, gen_oal_args(tiny_pipeline, runs, tmp_path / 'user'), tmp_path / 'logs1')
    assert codes == [2, 2] and 'did not write' in logs[0], logs  # rank 0 could not claim: rank 1 does not wait for it
    codes, logs = two_ranks(generate.main, gen_oal_args(tiny_pipeline, runs, tmp_path / 'ddp', '--batch-size', '2'), tmp_path / 'logs2')
    assert codes == [0, 0], logs  # one call per iteration: 0 and 2 on rank 0, 1 on rank 1
    np.testing.assert_allclose(np.load(tmp_path / 'ddp' / 'diffusion_outliers.npy'), np.load(oal_outliers / 'diffusion_outliers.npy'),
                               atol=1e-4)
    assert sorted(p.name for p in (tmp_path / 'ddp' / 'images').iterdir()) == sorted(p.name for p in (oal_outliers / 'images').iterdir())
    assert json.loads((tmp_path / 'ddp' / 'manifest.json').read_text())['done'] == [[0, 3]]


def test_fit_is_refused_while_another_script_writes_the_folder(tmp_path, capsys):
    out = tmp_path / 'shared'
    train_sio.claim(out, '--out', 'train_sio.py', {}, False, False, 'a run', 'hint')  # train_sio.py holds OUT/.lock now
    error = main_error(capsys, generate.main, *fit_args(out))
    assert 'holds a train_sio.py folder' in error  # refused before it would wait for the lock
    assert sorted(p.name for p in out.iterdir()) == ['.lock', 'manifest.json']  # nothing of fit's
    assert json.loads((out / 'manifest.json').read_text())['script'] == 'train_sio.py'
    other = tmp_path / 'other'  # a folder another process is starting a fit in: the same lock, OUT/.lock
    train_sio.claim(other, '--out', 'generate.py fit', {}, False, True, 'a pipeline', 'hint')
    assert f'in use by another process (pid {os.getpid()})' in main_error(capsys, generate.main, *fit_args(other))


def test_a_users_file_written_during_a_fit_survives_it(tmp_path, monkeypatch):
    out, check = tmp_path / 'pipe', generate.check_agreement

    def user_writes_notes(*args):  # the user saves a file in the folder while fit runs
        (out / 'notes.txt').write_text('mine')
        return check(*args)
    monkeypatch.setattr(generate, 'check_agreement', user_writes_notes)
    generate.main(fit_args(out))
    assert (out / 'notes.txt').read_text() == 'mine' and json.loads((out / 'manifest.json').read_text())['complete']
    assert 'notes.txt' not in json.loads((out / 'manifest.json').read_text())['files']


def test_a_failed_fit_leaves_the_folder_as_it_was(tiny_pipeline, tmp_path, capsys):
    import shutil
    shutil.copytree(tiny_pipeline, tmp_path / 'pipe')
    before = snapshot(tmp_path / 'pipe')
    for bad_input, word in ((['--vae-channels', '12'], '--vae-channels'), (['--lr', '1e30', '--vae-steps', '3'], 'nothing was saved'),
                            (['--dataset', 'cifar10', '--data-root', tmp_path / 'none'], '--data-root')):
        assert word in main_error(capsys, generate.main, *fit_args(tmp_path / 'pipe', '--overwrite', *bad_input))
        assert snapshot(tmp_path / 'pipe') == before, bad_input  # the old pipeline and its manifest, byte for byte
    generate.main(sio_args(tmp_path / 'pipe', tmp_path / 'set', '--per-class', '1'))  # still in use
    error = main_error(capsys, generate.main, *fit_args(tmp_path / 'new', '--lr', '1e30', '--vae-steps', '3'))
    assert 'loss is nan' in error and '--lr' in error  # a NaN fit saves nothing, not even a manifest
    assert [p.name for p in (tmp_path / 'new').iterdir()] == ['.lock']


def test_an_interrupted_fit_is_refused_until_it_is_run_again(tiny_pipeline, tmp_path, capsys, monkeypatch):
    import shutil
    shutil.copytree(tiny_pipeline, tmp_path / 'pipe')
    real_replace = os.replace

    def interrupt_after_the_first_entry(src, dst):
        real_replace(src, dst)
        if Path(src).parent.name == '.building' and Path(dst).parent.name != '.building':  # swapped in
            raise KeyboardInterrupt
    monkeypatch.setattr(os, 'replace', interrupt_after_the_first_entry)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        generate.main(fit_args(tmp_path / 'pipe', '--overwrite'))
    monkeypatch.setattr(os, 'replace', real_replace)
    assert stop.value.code == 130 and 'is unfinished' in capsys.readouterr().err
    assert (tmp_path / 'pipe' / 'fit.json').exists() and (tmp_path / 'pipe' / '.old').exists()  # half new, half old...
    assert 'unfinished' in main_error(capsys, generate.main, *sio_args(tmp_path / 'pipe', tmp_path / 'set'))  # ... never loaded
    generate.main(fit_args(tmp_path / 'pipe'))  # the same command ends it
    assert json.loads((tmp_path / 'pipe' / 'fit.json').read_text())['args']['steps'] == 1
    assert not list((tmp_path / 'pipe').glob('.[bo]*'))
    generate.main(sio_args(tmp_path / 'pipe', tmp_path / 'set', '--per-class', '1'))


def test_fit_overwrite_killed_before_its_swap_leaves_the_old_pipeline_complete_and_in_use(tiny_pipeline, tmp_path,
                                                                                          one_thread):
    import shutil
    old = json.loads((tiny_pipeline / 'manifest.json').read_text())
    for n in range(1, 30):
        shutil.rmtree(tmp_path / 'pipe', ignore_errors=True)
        shutil.copytree(tiny_pipeline, tmp_path / 'pipe')
        assert killed_after_write(n, generate.main, fit_args(tmp_path / 'pipe', '--seed', '7', '--overwrite'))
        manifest = json.loads((tmp_path / 'pipe' / 'manifest.json').read_text())
        if manifest['settings']['seed'] == 7:  # the swap has begun: unfinished from here on
            assert not manifest['complete'] and n > 1
            break
        assert manifest == old, n
        generate.load_pipeline(str(tmp_path / 'pipe'), torch.device('cpu'), 'fp32', 'pipeline', 'digits')  # still the old one, complete
    generate.main(fit_args(tmp_path / 'pipe', '--seed', '7', '--overwrite'))  # the same command ends it
    assert json.loads((tmp_path / 'pipe' / 'fit.json').read_text())['args']['seed'] == 7


def test_a_huge_set_starts_without_checking_every_path(tiny_pipeline, tmp_path, monkeypatch):
    checked, readable = [], generate.readable_image
    monkeypatch.setattr(generate, 'readable_image', lambda path: checked.append(path) or readable(path))
    start = time.time()
    generate.main(sio_args(tiny_pipeline, tmp_path / 'huge', '--per-class', '10000000', '--max-batches', '1', '--batch-size', '2',
                           '--steps', '1'))
    assert time.time() - start < 60 and checked == []
    manifest = json.loads((tmp_path / 'huge' / 'manifest.json').read_text())
    assert manifest['done'] == [[0, 1]] and not manifest['complete']
    assert sorted(str(p.relative_to(tmp_path / 'huge')) for p in (tmp_path / 'huge').rglob('*.png')) == ['000/0.png', '000/1.png']
    assert json.loads((tmp_path / 'huge' / 'meta.json').read_text())['counts'] == [2, 0, 0, 0, 0, 0]
    generate.main(sio_args(tiny_pipeline, tmp_path / 'huge', '--per-class', '10000000', '--max-batches', '1', '--batch-size', '2',
                           '--steps', '1'))
    assert json.loads((tmp_path / 'huge' / 'manifest.json').read_text())['done'] == [[0, 2]]
    assert checked == [tmp_path / 'huge' / '000' / f'{i}.png' for i in (0, 1)]  # the done batch's files only


def test_prompt_templates_hold_exactly_one_class_field(capsys):
    args = generate.get_args(['sio', '--out', 'x', '--prompt', 'a {} in {{braces}}'])
    assert args.prompt.format('zero') == 'a zero in {braces}'
    for bad_prompt in ('{{}}', 'a {} and {}', 'a {0}', 'a {name}', 'a {', 'a {:>9}', 'no field'):
        assert '--prompt' in main_error(capsys, generate.main, 'sio', '--out', 'x', '--prompt', bad_prompt), bad_prompt
    assert not Path('x').exists()


def test_sio_overwrite_replaces_the_old_images_and_removes_the_rest(tiny_pipeline, sio_samples, tmp_path):
    import shutil
    shutil.copytree(sio_samples, tmp_path / 'set')
    (tmp_path / 'set' / '002' / '0.png').write_bytes(b'damaged')
    generate.main(sio_args(tiny_pipeline, tmp_path / 'set', '--per-class', '2', '--steps', '1', '--overwrite'))
    assert sorted(str(p.relative_to(tmp_path / 'set')) for p in (tmp_path / 'set').rglob('*.png')) == [
        f'{c:03d}/{n}.png' for c in range(6) for n in range(2)]
    assert np.load(tmp_path / 'set' / 'images.npy').shape == (12, 8, 8, 3)
    assert generate.readable_image(tmp_path / 'set' / '002' / '0.png')
    manifest = json.loads((tmp_path / 'set' / 'manifest.json').read_text())
    assert manifest['complete'] and manifest['stale'] == [] and manifest['settings']['per_class'] == 2


def test_non_finite_images_latents_and_outliers_stop_in_one_line(tiny_pipeline, runs, tmp_path, capsys):
    error = main_error(capsys, generate.main, *gen_oal_args(tiny_pipeline, runs, tmp_path / 'sigma', '--knn-sigma', '3e38'))
    assert '--knn-sigma' in error and 'NaN' in error
    assert not (tmp_path / 'sigma' / 'knn_outliers.npy').exists()
    assert not json.loads((tmp_path / 'sigma' / 'manifest.json').read_text())['complete']
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float('nan'))
    pipe.save_pretrained(tmp_path / 'nan_pipe')  # no manifest: loaded as any pipeline folder
    error = main_error(capsys, generate.main, *sio_args(tmp_path / 'nan_pipe', tmp_path / 'nan_set'))
    assert 'NaN/inf images' in error and not list((tmp_path / 'nan_set').rglob('*.png'))
    assert json.loads((tmp_path / 'nan_set' / 'manifest.json').read_text())['done'] == []
    error = main_error(capsys, generate.main, *gen_oal_args(tmp_path / 'nan_pipe', runs, tmp_path / 'nan_oal'))
    assert 'NaN/inf latents' in error and not list((tmp_path / 'nan_oal' / 'latents').iterdir())


def test_oal_records_every_setting_and_reuses_knn_only_under_them(tiny_pipeline, runs, oal_outliers, tmp_path, capsys):
    import shutil
    shutil.copytree(oal_outliers, tmp_path / 'copy')
    error = main_error(capsys, generate.main, *gen_oal_args(tiny_pipeline, runs, tmp_path / 'copy', '--iterations', '2'))
    assert 'iterations 3 -> 2' in error and '--overwrite' in error
    assert np.load(tmp_path / 'copy' / 'diffusion_outliers.npy').shape == (6, 8)
    generate.main(gen_oal_args(tiny_pipeline, runs, tmp_path / 'copy', '--iterations', '2', '--overwrite'))
    assert 'knn:' in capsys.readouterr().out  # stale under the new settings: made again
    assert np.load(tmp_path / 'copy' / 'diffusion_outliers.npy').shape == (4, 8)
    assert sorted(p.name for p in (tmp_path / 'copy' / 'latents').iterdir()) == ['0000.npy', '0001.npy']
    assert len(list((tmp_path / 'copy' / 'images').iterdir())) == 4


def test_oal_reads_a_damaged_training_image_as_one_line(runs, tiny_pipeline, tmp_path, capsys):
    from PIL import Image
    images, labels = digits_train_set()
    for c, name in enumerate(train_sio.DIGIT_NAMES[:6]):  # a folder dataset with the digits teacher's classes
        for split, n in (('train', 3), ('val', 1)):
            (tmp_path / 'ds' / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(images[np.flatnonzero(labels == c)[i]]).save(tmp_path / 'ds' / split / name / f'{i}.png')
    (tmp_path / 'ds' / 'train' / 'three' / '1.png').write_bytes(b'\x89PNG cut short')
    error = main_error(capsys, generate.main, 'oal', '--pipeline', any_pipeline(tiny_pipeline, tmp_path / 'pipe'), '--teacher', runs / 'ce_s0', '--dataset',
                       f'folder:{tmp_path / "ds"}', '--out', tmp_path / 'o', '--features-per-class', '3', '--knn-k', '2',
                       '--boundary', '2', '--iterations', '1', '--steps', '1')
    assert 'three/1.png' in error


def test_fractals_touch_only_their_own_pictures(tmp_path, capsys):
    for extra in ([], ['--overwrite']):
        out = tmp_path / f'mixing{len(extra)}'
        out.mkdir()
        (out / '1.jpg').write_bytes(b'the user\'s picture')
        assert 'did not write' in main_error(capsys, generate.main, 'fractals', '--out', out, '--count', '3', '--size', '8', *extra)
        assert (out / '1.jpg').read_bytes() == b'the user\'s picture' and not list(out.glob('*.png'))
    generate.main(['fractals', '--out', str(tmp_path / 'set'), '--count', '4', '--size', '8'])
    first = (tmp_path / 'set' / '00001.png').read_bytes()
    generate.main(['fractals', '--out', str(tmp_path / 'set'), '--count', '2', '--size', '8', '--overwrite'])
    assert sorted(p.name for p in (tmp_path / 'set').iterdir()) == ['.lock', '00000.png', '00001.png', 'manifest.json']
    assert (tmp_path / 'set' / '00001.png').read_bytes() == first
    manifest = json.loads((tmp_path / 'set' / 'manifest.json').read_text())
    assert manifest['done'] == [[0, 1]] and manifest['complete'] and manifest['files'] == ['{00000..00001}.png']


def test_an_interrupt_says_what_is_kept_and_how_to_continue(tiny_pipeline, tmp_path, capsys, monkeypatch):
    saved, save_png = [], generate.save_png

    def interrupt_in_the_second_batch(image, path):
        if len(saved) == 4:
            raise KeyboardInterrupt
        saved.append(path)
        save_png(image, path)
    monkeypatch.setattr(generate, 'save_png', interrupt_in_the_second_batch)
    argv = sio_args(tiny_pipeline, tmp_path / 'set')
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        generate.main(argv + ['--overwrite'])
    lines = [l for l in capsys.readouterr().err.splitlines() if 'interrupted:' in l]
    assert stop.value.code == 130 and len(lines) == 1
    assert lines[0].split('interrupted: ')[1] == f'4 of 18 images in {tmp_path / "set"}; continue with: python generate.py {" ".join(argv)}'
    monkeypatch.setattr(generate, 'save_png', save_png)
    generate.main(argv)
    assert json.loads((tmp_path / 'set' / 'manifest.json').read_text())['complete']


# ================================================================================================
# train_oal.py

import train_oal  # noqa: E402


def test_club_matches_hand_computation():
    torch.manual_seed(0)
    club = train_oal.CLUB(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    mu, logvar = club.mu(x), club.logvar(x)
    total = 0.0
    for i in range(4):
        pos = -sum((mu[i, d] - y[i, d]) ** 2 / (2 * torch.exp(logvar[i, d])) for d in range(2))
        neg = -sum(sum((y[j, d] - mu[i, d]) ** 2 for j in range(4)) / 4 / (2 * torch.exp(logvar[i, d])) for d in range(2))
        total += (pos - neg) / 4
    assert club(x, y).item() == pytest.approx(total.item(), rel=1e-5)
    loglik = sum(sum(-(mu[i, d] - y[i, d]) ** 2 / torch.exp(logvar[i, d]) - logvar[i, d] for d in range(2)) for i in range(4)) / 4
    assert club.log_likelihood(x, y).item() == pytest.approx(loglik.item(), rel=1e-5)


def test_alternating_step_raises_q_likelihood():
    torch.manual_seed(0)
    club_knn, club_diff = train_oal.CLUB(5, 4), train_oal.CLUB(3, 4, deep_mu=True)
    student = torch.nn.Linear(2, 4)
    optimizer = torch.optim.SGD([dict(params=student.parameters(), lr=0.1),
                                 dict(params=list(club_knn.parameters()) + list(club_diff.parameters()), lr=1e-2)], momentum=0.9, nesterov=True)
    o_knn, o_diff, h = torch.randn(16, 5), torch.randn(16, 3), student(torch.randn(16, 2))
    value = lambda: (club_knn.log_likelihood(o_knn, h.detach()) + club_diff.log_likelihood(o_diff, h.detach())).item()
    weight = student.weight.detach().clone()
    before = value()
    train_oal.fit_q_step(optimizer, club_knn, club_diff, o_knn, o_diff, h)
    assert value() > before
    assert torch.equal(student.weight, weight)  # only q moved


def test_feature_kd_is_softmax_over_feature_dimensions():
    torch.manual_seed(0)
    h_s, target = torch.randn(3, 5), torch.randn(3, 5)
    p_t, p_s = torch.softmax(target, dim=1), torch.softmax(h_s, dim=1)
    by_hand = sum((p_t[i] * (p_t[i].log() - p_s[i].log())).sum() for i in range(3)) / 3
    assert train_oal.kl_teacher_student(h_s, target).item() == pytest.approx(by_hand.item(), rel=1e-5)


def oal_args(runs, outliers, out, *extra):
    return ['--dataset', 'digits', '--teacher', str(runs / 'ce_s0'), '--init', str(runs / 'ce_s0'), '--outliers', str(outliers),
            '--out', str(out)] + [str(e) for e in extra]


def test_oal_end_to_end_logs_terms_and_evaluates(runs, oal_outliers, tmp_path):
    train_oal.main(oal_args(runs, oal_outliers, tmp_path / 'oal', '--epochs', '3'))
    log = [json.loads(l) for l in (tmp_path / 'oal' / 'log.jsonl').read_text().splitlines()]
    assert len(log) == 3
    for row in log:  # the total is exactly the weighted sum of the logged terms
        assert row['loss'] == pytest.approx(row['ce'] + 4 * row['kd'] + 8 * row['feat'] + 0.1 * row['club_knn'] + 0.2 * row['club_diff'], rel=1e-4)
    assert log[-1]['lr'] == pytest.approx(1e-8)  # OAL's cosine ends at 1e-8 for the student
    ckpt = torch.load(tmp_path / 'oal' / 'best.pt', weights_only=False)
    assert ckpt['method'] == 'oal' and ckpt['val_acc'] > 0.85
    evaluate.main([str(tmp_path / 'oal'), '--detectors', 'ebo', '--out', str(tmp_path / 'eval')])
    assert json.loads((tmp_path / 'eval' / 'results.json').read_text())['ebo']['near']['ACC'] > 85


def test_oal_alternating_and_resume(runs, oal_outliers, tmp_path, capsys):
    common = ['--epochs', '2', '--club', 'alternating', '--seed', '1']
    train_oal.main(oal_args(runs, oal_outliers, tmp_path / 'straight', *common))
    train_oal.main(oal_args(runs, oal_outliers, tmp_path / 'split', *common, '--stop-after', '1'))
    import shutil
    shutil.copytree(oal_outliers, tmp_path / 'outliers_copy')
    for flag, value in (('--w-kd', '2'), ('--club', 'joint'), ('--outliers', tmp_path / 'outliers_copy')):
        error = main_error(capsys, train_oal.main, *oal_args(runs, oal_outliers, tmp_path / 'split', *common, '--resume', flag, value))
        assert flag in error, error  # every flag that defines the run must match last.pt's
    (tmp_path / 'split' / 'log.jsonl').unlink()  # as if killed between last.pt and log.jsonl
    train_oal.main(oal_args(runs, oal_outliers, tmp_path / 'split', *common, '--resume'))
    a = torch.load(tmp_path / 'straight' / 'last.pt', weights_only=False)
    b = torch.load(tmp_path / 'split' / 'last.pt', weights_only=False)
    for key in ('model', 'dt', 'club_knn', 'club_diff'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert [json.loads(l)['epoch'] for l in (tmp_path / 'split' / 'log.jsonl').read_text().splitlines()] == [1, 2]


def test_oal_mismatched_outliers_and_missing_assets(runs, oal_outliers, tmp_path, capsys):
    bad = tmp_path / 'bad'
    bad.mkdir()
    np.save(bad / 'knn_outliers.npy', np.zeros((6, 10, 64), np.float32))
    np.save(bad / 'diffusion_outliers.npy', np.zeros((4, 8), np.float32))
    error = main_error(capsys, train_oal.main, *oal_args(runs, bad, tmp_path / 'x'))
    assert '64-d' in error and '128-d' in error and '--teacher' in error
    proc = run_script('train_oal.py', '--dataset', 'digits', '--out', tmp_path / 'y', cwd=tmp_path)  # defaults, nothing there yet
    assert_user_error(proc, 'train_sio.py --dataset digits')
    assert 'generate.py oal' in main_error(capsys, train_oal.main, *oal_args(runs, tmp_path / 'none', tmp_path / 'z'))


def test_sio_rerun_with_other_settings_refuses(tiny_pipeline, sio_samples, tmp_path, capsys):
    import shutil
    shutil.copytree(sio_samples, tmp_path / 'copy')
    error = main_error(capsys, generate.main, *sio_args(tiny_pipeline, tmp_path / 'copy', '--prompt', 'a drawing of a {}'))
    assert 'other settings' in error and 'prompt_template' in error and '--overwrite' in error


# ================================================================================================
# Transformers teachers (train_oal.py and generate.py oal share load_teacher): label order, preprocessing,
# the accuracy check, the offline hub id, and the published crop / token injection

def tiny_vit(id2label, seed=0, image_size=8):
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       num_labels=len(id2label), id2label=dict(enumerate(id2label)), label2id={n: i for i, n in enumerate(id2label)})
    return ViTForImageClassification(config)


def save_vit(model, folder, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """A transformers image classifier folder as from the hub: config, weights and preprocessor_config.json."""
    from transformers import ViTImageProcessor
    model.save_pretrained(folder)
    size = model.config.image_size
    ViTImageProcessor(size={'height': size, 'width': size}, image_mean=list(mean), image_std=list(std)).save_pretrained(folder)
    return folder


def train_vit_teacher(folder, epochs=60, seed=0):
    """A small ViT (2 layers, 64-d, 2x2 patches) trained on the digits training split at 8x8 with the digits
    recipe's augmentation and saved as a transformers folder: a teacher that is not our CNN. To try one with
    train_oal.py --teacher: python -c "import test_smoke; test_smoke.train_vit_teacher('teachers/digits_vit')"."""
    from transformers import ViTConfig, ViTForImageClassification
    ds = train_sio.load_dataset('digits')
    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=2, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       num_labels=6, id2label=dict(enumerate(ds['classes'])), label2id={n: i for i, n in enumerate(ds['classes'])})
    model = ViTForImageClassification(config)
    x = torch.from_numpy(ds['train'][0]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(ds['train'][1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * math.ceil(len(y) / 64))
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            pixels = train_oal.normalize(train_oal.augment(x[idx], 1, False), (0.5,) * 3, (0.5,) * 3, 8).contiguous()
            loss = F.cross_entropy(model(pixel_values=pixels).logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return save_vit(model.eval(), Path(folder))


@pytest.fixture(scope='session')
def vit_teacher(tmp_path_factory):
    return train_vit_teacher(tmp_path_factory.mktemp('vit') / 'digits_vit', epochs=25)


DIGITS6 = ['zero', 'one', 'two', 'three', 'four', 'five']


def test_teacher_label_order_is_matched_by_name(tmp_path):
    cpu, x = torch.device('cpu'), torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    plain = tiny_vit(DIGITS6)
    perm = [3, 0, 5, 1, 4, 2]  # the shuffled model's output j is class perm[j]
    shuffled = tiny_vit([DIGITS6[p].upper() for p in perm])  # case, too, may differ
    shuffled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        shuffled.classifier.weight.copy_(plain.classifier.weight[perm])
        shuffled.classifier.bias.copy_(plain.classifier.bias[perm])
    forward_plain, _ = train_oal.load_teacher(str(save_vit(plain, tmp_path / 'plain')), cpu, DIGITS6)
    forward_shuffled, info = train_oal.load_teacher(str(save_vit(shuffled, tmp_path / 'shuffled')), cpu, DIGITS6)
    with torch.no_grad():
        (z_plain, h_plain), (z_shuffled, h_shuffled) = forward_plain(x), forward_shuffled(x)
        z_raw = plain(pixel_values=(x.float() / 255 - 0.5) / 0.5).logits
    assert info['class_order'] == [perm.index(c) for c in range(6)]
    torch.testing.assert_close(z_shuffled, z_plain)
    torch.testing.assert_close(z_plain, z_raw)
    torch.testing.assert_close(h_shuffled, h_plain)
    forward_ignored, _ = train_oal.load_teacher(str(tmp_path / 'shuffled'), cpu, DIGITS6, 'ignore')
    with torch.no_grad():
        assert not torch.allclose(forward_ignored(x)[0], z_plain)  # 'ignore' takes the outputs as they come


def test_teacher_label_mismatch_and_generic_labels(tmp_path, capsys):
    cpu = torch.device('cpu')
    save_vit(tiny_vit(DIGITS6[:5] + ['six']), tmp_path / 'other')
    with pytest.raises(SystemExit):
        train_oal.load_teacher(str(tmp_path / 'other'), cpu, DIGITS6)
    error = capsys.readouterr().err
    assert "no class named 'five'" in error and '--teacher-class-order ignore' in error
    _, info = train_oal.load_teacher(str(save_vit(tiny_vit([f'LABEL_{i}' for i in range(6)]), tmp_path / 'generic')), cpu, DIGITS6)
    assert info['class_order'] == 'as the dataset'  # labels without names: taken in order, the accuracy check guards them
    with pytest.raises(SystemExit):
        train_oal.load_teacher(str(tmp_path / 'generic'), cpu, DIGITS6 + ['six'])
    assert '6 classes but the dataset has 7' in capsys.readouterr().err


def test_teacher_preprocessing_is_read_from_its_config(tmp_path):
    cpu, x = torch.device('cpu'), torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    model = tiny_vit(DIGITS6)
    mean, std = (0.1, 0.2, 0.3), (0.2, 0.3, 0.4)
    forward_default, info_default = train_oal.load_teacher(str(save_vit(model, tmp_path / 'half')), cpu, DIGITS6)
    forward_own, info_own = train_oal.load_teacher(str(save_vit(model, tmp_path / 'own', mean, std)), cpu, DIGITS6)
    assert info_own['mean'] == list(mean) and info_own['std'] == list(std) and info_default['mean'] == [0.5] * 3
    by_hand = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.vit(pixel_values=by_hand).last_hidden_state[:, 0]  # ViT's pre-logit feature: the normalised [CLS] token
        own, default = forward_own(x)[1], forward_default(x)[1]
    torch.testing.assert_close(own, expected)
    assert not torch.allclose(own, default, atol=1e-3)
    # A teacher at another input size gets the images resized to it
    big = tiny_vit(DIGITS6, image_size=16)
    forward_big, info_big = train_oal.load_teacher(str(save_vit(big, tmp_path / 'big')), cpu, DIGITS6)
    assert info_big['image_size'] == 16
    with torch.no_grad():
        expected = big(pixel_values=(F.interpolate(x.float() / 255, size=(16, 16), mode='bilinear', align_corners=False) - 0.5) / 0.5).logits
        torch.testing.assert_close(forward_big(x)[0], expected)


def test_hub_teacher_offline_is_one_line_naming_the_id(capsys):
    with pytest.raises(SystemExit) as stop:
        train_oal.load_teacher(train_oal.TEACHERS['cifar10'], torch.device('cpu'), [str(i) for i in range(10)])
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert train_oal.TEACHERS['cifar10'] in lines[0] and 'huggingface-cli download' in lines[0] and '--teacher DIR' in lines[0]
    assert generate.TEACHERS == train_oal.TEACHERS


def test_default_teachers_follow_the_paper():
    assert train_oal.get_args(['--dataset', 'cifar10']).teacher == train_oal.TEACHERS['cifar10']  # a ViT-B/16 fine-tuned at 224
    assert train_oal.get_args(['--dataset', 'cifar100']).teacher == train_oal.TEACHERS['cifar100']
    assert train_oal.get_args(['--dataset', 'cifar10', '--teacher', 'baseline']).teacher == 'runs/cifar10_ce_s0'
    assert train_oal.get_args(['--dataset', 'digits']).teacher == 'runs/digits_ce_s0'
    args = train_oal.get_args(['--dataset', 'cifar10'])
    assert (args.crop, args.teacher_class_order, args.teacher_min_acc) == ('published', 'auto', 0.5)
    assert generate.get_args(['oal', '--out', 'x']).inject == 'published'


def test_oal_refuses_a_teacher_that_does_not_fit_the_data(runs, oal_outliers, tmp_path, capsys):
    random_vit = save_vit(tiny_vit([f'LABEL_{i}' for i in range(6)], seed=3), tmp_path / 'random_vit')
    error = main_error(capsys, train_oal.main, *oal_args(runs, oal_outliers, tmp_path / 'x', '--teacher', random_vit))  # the last --teacher counts
    assert '--teacher-min-acc' in error and 'top-1' in error and not (tmp_path / 'x' / 'last.pt').exists()


def test_oal_with_a_transformers_teacher_end_to_end(tiny_pipeline, vit_teacher, runs, tmp_path, capsys):
    out = tmp_path / 'outliers'
    generate.main(['oal', '--pipeline', str(tiny_pipeline), '--teacher', str(vit_teacher), '--dataset', 'digits', '--out', str(out),
                   '--iterations', '2', '--samples-per-iteration', '2', '--steps', '2', '--features-per-class', '40', '--knn-k', '10',
                   '--knn-draws', '50', '--boundary', '5', '--repeats', '2', '--teacher-norm', 'own'])
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['teacher']['kind'] == 'transformers' and meta['teacher']['val_acc'] > 0.8 and meta['inject'] == 'published'
    assert np.load(out / 'knn_outliers.npy').shape == (6, 20, 64)  # the ViT's 64-d [CLS] feature
    capsys.readouterr()
    train_oal.main(oal_args(runs, out, tmp_path / 'oal', '--epochs', '2', '--teacher', vit_teacher, '--teacher-norm', 'own'))
    printed = capsys.readouterr().out
    assert 'val top-1' in printed and 'inputs 8px, mean [0.5, 0.5, 0.5]' in printed
    ckpt = torch.load(tmp_path / 'oal' / 'best.pt', weights_only=False)
    assert ckpt['teacher']['name'] == str(vit_teacher) and ckpt['teacher']['val_acc'] > 0.8 and ckpt['val_acc'] > 0.85


def test_init_from_another_dataset_takes_the_backbone_only(runs, oal_outliers, tmp_path, capsys):
    ckpt = torch.load(runs / 'ce_s0' / 'best.pt', weights_only=False)
    ckpt.update(dataset='cifar100', num_classes=10, classes=[str(i) for i in range(10)])
    ckpt['model']['fc.weight'], ckpt['model']['fc.bias'] = torch.randn(10, 128), torch.randn(10)
    torch.save(ckpt, tmp_path / 'other.pt')
    train_oal.main(oal_args(runs, oal_outliers, tmp_path / 'oal', '--epochs', '1', '--init', tmp_path / 'other.pt'))
    printed = capsys.readouterr().out
    assert 'backbone from its cifar100 training (10 classes), classifier head initialised afresh for 6 classes' in printed
    assert torch.load(tmp_path / 'oal' / 'best.pt', weights_only=False)['num_classes'] == 6


def test_published_crop_shifts_at_most_pad_pixels_at_the_training_size():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (6, 3, 32, 32), dtype=torch.uint8)
    resized = train_oal.augment(x, 0, False, 224)
    assert resized.shape == (6, 3, 224, 224) and resized.dtype == torch.uint8
    cropped = train_oal.augment(x, 4, False, 224)
    padded = F.pad(resized, (4, 4, 4, 4))
    for i in range(6):  # each crop is the resized image moved by at most 4 px (zeros shifted in)
        shifts = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(cropped[i], padded[i, :, dy:dy + 224, dx:dx + 224])]
        assert len(shifts) == 1, i
    native = train_oal.augment(x, 4, False)  # native: the crop at 32x32, before any upsampling (+-28 px at 224)
    assert native.shape == (6, 3, 32, 32)
    assert train_sio.augment.__doc__ == train_oal.augment.__doc__ == generate.augment.__doc__


def test_published_injection_leaves_cifar10_prompts_unchanged(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel
    cifar10 = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    words = ['a', 'high', 'quality', 'image', 'of', 'the'] + cifar10 + generate.OAL_INJECT_LABELS[:10]
    tokenizer = generate.build_tokenizer(words, tmp_path / 'tok', 77)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=77, eos_token_id=len(tokenizer) - 1)).eval()
    vector = torch.full((32,), 3.0)
    for c, name in enumerate(cifar10):
        ids = tokenizer(generate.OAL_PROMPT.format(name), return_tensors='pt').input_ids
        with torch.no_grad():
            plain = encoder(ids).last_hidden_state
            with generate.injected(encoder, generate.injected_tokens(tokenizer, cifar10, c, 'published'), vector):
                published = encoder(ids).last_hidden_state
            with generate.injected(encoder, generate.injected_tokens(tokenizer, cifar10, c, 'fixed'), vector):
                fixed = encoder(ids).last_hidden_state
        assert torch.equal(published, plain), name  # the authors' token ('apples' for class 0...) is not in a CIFAR-10 prompt
        assert not torch.allclose(fixed, plain), name
    # CIFAR-100 with the authors' prompt words: their token is in the prompt, so it is replaced
    ids = tokenizer(generate.OAL_PROMPT.format(generate.OAL_CIFAR100_NAMES[0]), return_tensors='pt').input_ids
    assert generate.injected_tokens(tokenizer, generate.OAL_CIFAR100_NAMES, 0, 'published')[0] in ids[0].tolist()


# timm teachers (the authors' kind): a tiny ViT with random weights, as the hub holds them (config.json + weights,
# a fake hub cache offline) and as OpenOOD saves them (a bare state_dict)

def tiny_timm_vit(num_classes=6, seed=0):
    """A timm VisionTransformer of 8x8 inputs, 4x4 patches, 64 dims in one head (the 64-dim heads of every standard
    ViT, which a bare state_dict's architecture is inferred with), two blocks."""
    import timm
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', img_size=8, patch_size=4, embed_dim=64, depth=2, num_heads=1,
                             num_classes=num_classes).eval()


def save_timm(model, folder, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), weights='pytorch_model.bin'):
    """The hub layout of the authors' CIFAR-10 teacher: config.json whose architecture carries the org and tag (which
    timm's own hf-hub loader refuses), model_args, pretrained_cfg with the statistics, and the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(architecture='timm/vit_tiny_patch16_224.augreg_in21k', num_classes=model.num_classes, num_features=64,
                  global_pool='token', model_args=dict(img_size=8, patch_size=4, embed_dim=64, depth=2, num_heads=1),
                  pretrained_cfg=dict(input_size=[3, 8, 8], mean=list(mean), std=list(std), num_classes=1000))
    (folder / 'config.json').write_text(json.dumps(config))
    if weights.endswith('.safetensors'):
        from safetensors.torch import save_file
        save_file(model.state_dict(), folder / weights)
    else:
        torch.save(model.state_dict(), folder / weights)
    return folder


def timm_forward(model, x, mean, std, size):
    """timm's own forward on the teacher's input: uint8 -> [0, 1] -> resized -> normalised."""
    pixels = F.interpolate(x.float() / 255, size=(size, size), mode='bilinear', align_corners=False) if x.shape[-1] != size \
        else x.float() / 255
    pixels = ((pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).contiguous(
        memory_format=torch.channels_last)  # the layout the scripts feed every network
    with torch.no_grad():
        return model(pixels), model.forward_head(model.forward_features(pixels), pre_logits=True)


def test_timm_teachers_from_a_folder_a_hub_cache_and_a_bare_state_dict(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub
    cpu, x = torch.device('cpu'), torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    model = tiny_timm_vit()
    folder = save_timm(model, tmp_path / 'folder')
    snapshot = tmp_path / 'hub' / 'models--someone--tiny-vit' / 'snapshots' / ('0' * 40)  # the hub cache, offline
    save_timm(model, snapshot, weights='model.safetensors')
    (tmp_path / 'hub' / 'models--someone--tiny-vit' / 'refs').mkdir()
    (tmp_path / 'hub' / 'models--someone--tiny-vit' / 'refs' / 'main').write_text('0' * 40)
    monkeypatch.setattr(hub, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(hub, 'HF_HUB_OFFLINE', True)
    torch.save(model.state_dict(), tmp_path / 'best.ckpt')  # OpenOOD's: the bare state_dict
    digits_stats = train_oal.load_dataset('digits')
    for spec, stats, expected in ((folder, None, (0.5,) * 3), ('someone/tiny-vit', None, (0.5,) * 3),
                                  (tmp_path / 'best.ckpt', (digits_stats['mean'], digits_stats['std']), digits_stats['mean']),
                                  (folder, (digits_stats['mean'], digits_stats['std']), digits_stats['mean'])):
        forward, info = train_oal.load_teacher(str(spec), cpu, DIGITS6, stats=stats)
        assert info['kind'] == 'timm' and info['feature_dim'] == 64 and info['image_size'] == 8, spec
        assert info['class_order'] == 'as the dataset' and tuple(info['mean']) == tuple(expected), spec
        std = stats[1] if stats else (0.5,) * 3
        logits, features = timm_forward(model, x, expected, std, 8)
        with torch.no_grad():
            got_logits, got_features = forward(x)
        torch.testing.assert_close(got_logits, logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_features, features, atol=1e-6, rtol=0)
    assert generate.load_teacher(str(folder), cpu, DIGITS6)[1]['name'] == str(folder)  # the same loader in generate.py


def test_timm_teacher_mismatches_are_one_line(tmp_path, capsys):
    cpu = torch.device('cpu')
    save_timm(tiny_timm_vit(num_classes=100), tmp_path / 'hundred')
    with pytest.raises(SystemExit):
        train_oal.load_teacher(str(tmp_path / 'hundred'), cpu, [str(i) for i in range(10)])
    assert 'has 100 classes but the dataset has 10' in capsys.readouterr().err
    torch.save(tiny_timm_vit().state_dict(), tmp_path / 'bare.ckpt')
    with pytest.raises(SystemExit):  # a bare state_dict has no statistics of its own
        train_oal.load_teacher(str(tmp_path / 'bare.ckpt'), cpu, DIGITS6)
    assert '--teacher-norm published' in capsys.readouterr().err
    state = tiny_timm_vit().state_dict()
    state['head.weight'] = state['head.weight'][:, :32]  # a head that does not fit: refused, never loaded loosely
    torch.save(state, tmp_path / 'broken.ckpt')
    with pytest.raises(SystemExit):
        train_oal.load_teacher(str(tmp_path / 'broken.ckpt'), cpu, DIGITS6, stats=((0.5,) * 3, (0.5,) * 3))
    err = capsys.readouterr().err
    assert 'loads strictly' in err and 'head.weight' in err and len(err.strip().splitlines()) == 1


def test_teacher_norm_published_feeds_the_dataset_statistics_and_says_what_own_would_give(runs, tmp_path, capsys):
    folder = save_timm(tiny_timm_vit(seed=1), tmp_path / 'vit')  # random weights: --teacher-min-acc 0
    (tmp_path / 'outliers').mkdir()  # outliers in the ViT's 64-d feature space
    np.save(tmp_path / 'outliers' / 'knn_outliers.npy', np.random.RandomState(0).randn(6, 4, 64).astype(np.float32))
    np.save(tmp_path / 'outliers' / 'diffusion_outliers.npy', np.random.RandomState(1).randn(4, 8).astype(np.float32))
    digits_mean = [round(m, 4) for m in train_oal.load_dataset('digits')['mean']]
    for norm, mean, note in (('published', digits_mean, True), ('own', [0.5] * 3, False)):
        capsys.readouterr()
        train_oal.main(oal_args(runs, tmp_path / 'outliers', tmp_path / norm, '--teacher', folder, '--teacher-norm', norm,
                                '--teacher-min-acc', '0', '--epochs', '1'))
        line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith('teacher '))
        assert f'inputs 8px, mean {mean}' in line and ('with its own statistics (--teacher-norm own)' in line) == note, line
        assert torch.load(tmp_path / norm / 'last.pt', weights_only=False)['run']['teacher_norm'] == norm
    assert '--teacher-norm' in main_error(capsys, train_oal.main, *oal_args(  # a run is resumed only with its input
        runs, tmp_path / 'outliers', tmp_path / 'own', '--teacher', folder, '--teacher-min-acc', '0', '--epochs', '1',
        '--resume'))


def test_oal_draws_distinct_outliers_and_sizes_club_from_d():
    idx = train_oal.distinct(300, 128, torch.device('cpu'))
    assert len(idx) == 128 and len(set(idx.tolist())) == 128  # OAL: randperm(pool)[:n] at every step
    counts = torch.bincount(train_oal.distinct(5, 12, torch.device('cpu')), minlength=5)
    assert counts.sum() == 12 and counts.min() >= 2 and counts.max() <= 3  # a small pool is gone through again
    deep = train_oal.CLUB(64, 512, deep_mu=True)
    assert [m.out_features for m in deep.mu if isinstance(m, torch.nn.Linear)] == [32, 16, 256, 512]  # DEEP_CLUB: d, d/2, d/4, 256
    assert [m.out_features for m in train_oal.CLUB(768, 512).mu if isinstance(m, torch.nn.Linear)] == [256, 512]


# ================================================================================================
# quickstart.sh: the README's one command, with tiny settings

@pytest.fixture(scope='session', autouse=True)
def quickstart_in_background(request, tmp_path_factory):
    """The quickstart chain (QUICK=1) is seven interpreter start-ups, mostly on one core: it starts with the session and runs
    beside the in-process tests, and its test below waits for it (about 30 s less for the suite on 2 cores). Each side gets
    one thread while it runs: two OpenMP pools spinning on the same two cores slowed the in-process tests up to 4x."""
    if not any(item.name == 'test_quickstart_chain_ends_with_the_comparison_table' for item in request.session.items):
        yield None
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp('quickstart')
    with open(folder / 'stdout', 'w') as out, open(folder / 'stderr', 'w') as err:
        proc = subprocess.Popen(['bash', str(REPO / 'quickstart.sh'), str(folder / 'qs')], stdout=out, stderr=err, start_new_session=True,
                                env=dict(OFFLINE, QUICK='1', PYTHON=sys.executable, OMP_NUM_THREADS='1'))
    yield proc, folder
    torch.set_num_threads(threads)
    if proc.poll() is None:  # the session ended early (-x, Ctrl-C): the script and the stage it runs
        import signal
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_quickstart_chain_ends_with_the_comparison_table(quickstart_in_background):
    proc, folder = quickstart_in_background
    proc.wait(timeout=900)
    stdout, stderr = (folder / 'stdout').read_text(), (folder / 'stderr').read_text()
    assert proc.returncode == 0, stderr[-3000:]
    table = [l for l in stdout.splitlines() if l.startswith('| ')]
    assert table[0].startswith('| detector | setting | near AUROC | far AUROC | near FPR@95 | far FPR@95 | ACC |')
    rows = [tuple(c.strip() for c in l.split('|')[1:3]) for l in table[1:]]  # the |---| line does not start with '| '
    assert rows == [(d, s) for d in ('msp', 'ebo', 'knn') for s in ('baseline', 'sio', 'oal')]
    assert all(l.count('±') == 5 for l in table[1:])  # mean ± std over the seeds in every cell
    results = json.loads((folder / 'qs' / 'results' / 'results.json').read_text())
    assert set(results) == {'baseline', 'sio', 'oal', '_meta'} and results['_meta']['runs']['oal'] == ['oal_s0', 'oal_s1']
    stages = stdout[stdout.index('wall time per stage:'):].splitlines()[1:]
    assert [l.split()[0] for l in stages] == ['fit', 'ce', 'sio-images', 'sio', 'oal-outliers', 'oal', 'lanes', 'evaluate', 'total']
    assert [l.split('(')[-1] for l in stages[2:6]] == ['lane 1)'] * 2 + ['lane 2)'] * 2  # SIO and OAL ran beside each other
    assert {p.name for p in (folder / 'qs' / 'logs').iterdir()} == {'sio-images.log', 'sio.log', 'oal-outliers.log', 'oal.log'}
    assert [l.split()[1] for l in stages if l.split()[0] in ('ce', 'sio', 'oal')] == ['0,1'] * 3  # each trainer: both seeds in one process
    oal_init = [torch.load(folder / 'qs' / 'runs' / f'oal_s{s}' / 'best.pt', weights_only=False)['args']['init'] for s in (0, 1)]
    assert [Path(p).name for p in oal_init] == ['ce_s0', 'ce_s1']  # {seed} in --init: each student starts from its own seed's baseline
    # a rerun into the finished folder runs nothing and prints the same table
    rerun = subprocess.run(['bash', str(REPO / 'quickstart.sh'), str(folder / 'qs')], env=dict(OFFLINE, QUICK='1', PYTHON=sys.executable),
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [l.split()[0] for l in rerun.stdout[rerun.stdout.index('wall time per stage:'):].splitlines()[1:]] == ['total']
    assert [l for l in rerun.stdout.splitlines() if l.startswith('| ')] == table


def test_quickstart_stops_both_lanes_when_one_fails(tmp_path):
    """A stage that fails in one lane ends the run at once: the other lane's process is stopped, the exit code is not 0 and
    the failed stage's log is shown. A stand-in interpreter: the baseline passes, the OAL outliers fail, SIO would sleep."""
    fake = tmp_path / 'python'
    fake.write_text('#!/bin/bash\ncase "$*" in\n  *train_sio.py*ce_s*) exit 0 ;;\n'
                    '  *generate.py\\ oal*) sleep 1; echo "error: the outliers broke"; exit 2 ;;\n'
                    f'  *) echo $$ >> {tmp_path}/sleepers; exec sleep 60 ;;\nesac\n')
    fake.chmod(0o755)
    work = tmp_path / 'qs'
    (work / 'pipeline').mkdir(parents=True)
    (work / 'pipeline' / 'manifest.json').write_text('{"complete": true}')  # fit counts as done
    start = time.time()
    proc = subprocess.run(['bash', str(REPO / 'quickstart.sh'), str(work)], env=dict(os.environ, QUICK='1', PYTHON=str(fake)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.time() - start < 30
    assert 'oal-outliers failed (lane 2)' in proc.stderr and 'error: the outliers broke' in proc.stderr
    sleepers = (tmp_path / 'sleepers').read_text().split()
    assert sleepers  # sio-images in lane 1 was started ...
    for pid in sleepers:  # ... and is gone
        assert not Path(f'/proc/{pid}').exists() or 'sleep' not in Path(f'/proc/{pid}/cmdline').read_text()


# ================================================================================================
# Loading paths on local stand-ins written in the real on-disk formats

CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def write_cifar10(root, n_train=20, n_test=1200):
    """cifar-10-batches-py exactly as torchvision reads it (pickled dicts of uint8 rows), random pixels."""
    import pickle
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name, n in [(f'data_batch_{i}', n_train) for i in range(1, 6)] + [('test_batch', n_test)]:
        with open(folder / name, 'wb') as f:
            pickle.dump({'data': rng.randint(0, 256, (n, 3072), dtype=np.uint8), 'labels': [int(v) for v in rng.randint(0, 10, n)]}, f)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': CIFAR10_NAMES}, f)


def test_cifar_split_and_openood_lists_on_stand_ins(tmp_path, monkeypatch, capsys):
    import torchvision
    from PIL import Image
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda *a, **k: True)  # the one thing a stand-in cannot match: md5
    monkeypatch.setenv('HTTPS_PROXY', 'http://127.0.0.1:9')
    write_cifar10(tmp_path / 'data')
    ds = train_sio.load_dataset('cifar10', str(tmp_path / 'data'))
    test = torchvision.datasets.CIFAR10(str(tmp_path / 'data'), train=False)
    perm = np.random.RandomState(0).permutation(1200)
    assert ds['classes'] == CIFAR10_NAMES and len(ds['train'][1]) == 100 and ds['image_size'] == 32
    assert np.array_equal(ds['val'][0], test.data[perm[:1000]]) and np.array_equal(ds['test'][1], np.array(test.targets)[perm[1000:]])
    # OpenOOD's benchmark_imglist/ + images_classic/: its lists are used exactly
    openood = tmp_path / 'openood'
    lists = openood / 'benchmark_imglist' / 'cifar10'
    lists.mkdir(parents=True)
    for split, name, count in (('val', 'cifar10', 3), ('test', 'cifar10', 4), ('test', 'tin', 5)):
        lines = []
        for i in range(count):
            rel = f'{name}/{split}/{i}.png'
            (openood / 'images_classic' / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((64 if name == 'tin' else 32,) * 2 + (3,), 10 * i, np.uint8)).save(openood / 'images_classic' / rel)
            lines.append(f'{rel} {i % 10}')
        (lists / f'{split}_{name}.txt').write_text('\n'.join(lines) + '\n')
    ds = train_sio.load_dataset('cifar10', str(tmp_path / 'data'), str(openood))
    assert len(ds['val'][1]) == 3 and list(ds['test'][1]) == [0, 1, 2, 3] and ds['test'][0][2].max() == 20
    args = evaluate.get_args(['x', '--openood-root', str(openood), '--data-root', str(tmp_path / 'data')])
    sets = evaluate.ood_sets(args, 'cifar10', 32, 32)
    assert set(sets) == {'tin'} and sets['tin'][0] == 'near' and len(sets['tin'][1]) == 5  # the rest skipped offline
    assert evaluate.read_batch([(f, 32, 32) for f in sets['tin'][1]]).shape == (5, 3, 32, 32)  # 64x64 files, read at 32
    args.strict = True  # a missing built-in set: a warning above, an error with --strict
    with pytest.raises(SystemExit):
        evaluate.ood_sets(args, 'cifar10', 32, 32)
    assert 'OOD set cifar100 is missing' in capsys.readouterr().err


def test_folder_dataset_trains_and_evaluates(tmp_path):
    from PIL import Image
    rng = np.random.RandomState(0)
    for split, n in (('train', 12), ('val', 4)):
        for c, name in enumerate(['cat', 'dog']):
            (tmp_path / 'set' / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.randint(0, 100, (20, 24, 3)) + 120 * c).astype(np.uint8)).save(tmp_path / 'set' / split / name / f'{i}.jpg')
    common = ['--dataset', f'folder:{tmp_path / "set"}', '--arch', 'cnn', '--image-size', '16', '--workers', '0']
    train_sio.main(common + ['--epochs', '2', '--batch-size', '8', '--out', str(tmp_path / 'run')])
    ckpt = torch.load(tmp_path / 'run' / 'best.pt', weights_only=False)
    assert ckpt['classes'] == ['cat', 'dog'] and ckpt['image_size'] == 16 and len(json.loads((tmp_path / 'run' / 'log.jsonl').read_text().splitlines()[0])) > 5
    (tmp_path / 'noise').mkdir()
    for i in range(6):
        Image.fromarray(rng.randint(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / 'noise' / f'{i}.png')
    evaluate.main([str(tmp_path / 'run'), '--far', f'noise={tmp_path / "noise"}', '--detectors', 'msp,knn', '--knn-k', '3', '--out', str(tmp_path / 'e')])
    results = json.loads((tmp_path / 'e' / 'results.json').read_text())
    assert set(results['knn']) == {'noise', 'far'} and results['_meta']['near'] == []


def test_imagenet_subset_trains_and_scores_the_other_classes_as_ood(tiny_pipeline, tmp_path):
    """A stand-in ImageNet layout (WordNet-id folders): --classes keeps two of three classes, labelled in sorted-wnid
    order as the SIO code does; generate.py sio makes the subset's set (PNGs only: no images.npy for folder datasets),
    which the trainer reads from disk; evaluate.py scores the left-out class as near-OOD."""
    from PIL import Image
    rng = np.random.RandomState(0)
    wnids = ['n02085620', 'n01440764', 'n09999999']
    for split, n in (('train', 10), ('val', 4)):
        for c, wnid in enumerate(wnids):
            (tmp_path / 'inet' / split / wnid).mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.randint(0, 80, (20, 24, 3)) + 80 * c).astype(np.uint8)).save(tmp_path / 'inet' / split / wnid / f'{wnid}_{i}.JPEG')
    (tmp_path / 'subset.txt').write_text('n02085620 Chihuahua\nn01440764 tench, Tinca tinca\n')  # LOC_synset_mapping.txt lines
    ds = train_sio.load_dataset(f'folder:{tmp_path / "inet"}', classes=str(tmp_path / 'subset.txt'))
    assert ds['classes'] == ['n01440764', 'n02085620'] and list(np.bincount(ds['train'][1])) == [10, 10] and len(ds['val'][0]) == 8
    assert all(f'/{ds["classes"][y]}/' in f for f, y in zip(*ds['train']))
    assert len(ds['other_classes']) == 4 and all('/n09999999/' in f for f in ds['other_classes'])
    names = [f'n{i:08d}' for i in range(1000)]  # the SIO code's subsets: positions among ImageNet-1K's sorted wnids
    assert train_sio.subset_classes('imagenet-10', names) == ['n00000031', 'n00000062', 'n00000094', 'n00000207', 'n00000281',
                                                              'n00000404', 'n00000569', 'n00000751', 'n00000814', 'n00000949']
    assert train_sio.subset_classes('imagenet-dogs', names) == names[151:251]
    subset = ['--dataset', f'folder:{tmp_path / "inet"}', '--classes', str(tmp_path / 'subset.txt')]
    generate.main(['sio', '--pipeline', str(any_pipeline(tiny_pipeline, tmp_path / 'pipe')), '--per-class', '3', '--steps', '2',
                   '--batch-size', '6', '--out', str(tmp_path / 'syn'), '--class-names', str(tmp_path / 'subset.txt')] + subset)
    meta = json.loads((tmp_path / 'syn' / 'meta.json').read_text())
    assert meta['classes'] == ['n01440764', 'n02085620'] and meta['prompts'] == ['a photo of a tench', 'a photo of a Chihuahua']
    assert meta['complete'] and not (tmp_path / 'syn' / 'images.npy').exists() and len(list((tmp_path / 'syn').rglob('*.png'))) == 6
    common = subset + ['--arch', 'cnn', '--image-size', '16', '--workers', '0']
    train_sio.main(common + ['--synthetic', str(tmp_path / 'syn'), '--epochs', '2', '--batch-size', '10', '--out', str(tmp_path / 'run')])
    ckpt = torch.load(tmp_path / 'run' / 'best.pt', weights_only=False)
    assert ckpt['classes'] == ['n01440764', 'n02085620'] and ckpt['num_classes'] == 2 and ckpt['args']['classes'] == str(tmp_path / 'subset.txt')
    evaluate.main([str(tmp_path / 'run'), '--detectors', 'msp,ebo', '--out', str(tmp_path / 'e')])
    results = json.loads((tmp_path / 'e' / 'results.json').read_text())
    assert results['_meta']['near'] == ['other-classes'] and 0 <= results['msp']['other-classes']['AUROC'] <= 100


def test_synthetic_folder_set_stays_on_disk(tmp_path):
    """Folder datasets: synthetic images are read by the loader's workers as used, so loading 4x more images costs
    a path each, not their pixels (in memory at 224 they would cost 150 kB each)."""
    import pickle
    import tracemalloc
    from PIL import Image
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    peaks = {}
    for n in (100, 400):
        for c in range(2):
            (tmp_path / f'set{n}' / f'{c:03d}').mkdir(parents=True)
            for i in range(n // 2):
                image.save(tmp_path / f'set{n}' / f'{c:03d}' / f'{i}.png')
        (tmp_path / f'npy{n}').mkdir()
        np.save(tmp_path / f'npy{n}' / 'images.npy', np.zeros((n, 32, 32, 3), np.uint8))
        np.save(tmp_path / f'npy{n}' / 'labels.npy', np.arange(n) % 2)
        for kind, on_disk in (('set', True), ('npy', True), ('set', False)):
            tracemalloc.start()
            train_sio.load_synthetic(tmp_path / f'{kind}{n}', 'folder:x', ['a', 'b'], 224, on_disk)
            peaks[kind, on_disk, n] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert peaks['set', False, 400] - peaks['set', False, 100] > 300 * 224 * 224 * 3  # every image held at 224: what it used to be
    assert peaks['set', True, 400] - peaks['set', True, 100] < 300 * 2000, peaks  # a path per image
    assert peaks['npy', True, 400] - peaks['npy', True, 100] < 300 * 100, peaks  # a memory map: labels only
    files, labels = train_sio.load_synthetic(tmp_path / 'set100', 'folder:x', ['a', 'b'], 224, True)
    mapped, mapped_labels = train_sio.load_synthetic(tmp_path / 'npy100', 'folder:x', ['a', 'b'], 224, True)
    real = [str(tmp_path / 'set100' / '000' / '0.png')] * 3
    for extra, extra_labels in ((files, labels), (mapped, mapped_labels)):
        folder_set = train_sio.FolderImages(real, np.zeros(3, np.int64), 16, True, extra, extra_labels)
        assert len(folder_set) == 103 and folder_set[3 + 51][0].shape == (3, 16, 16) and folder_set[3 + 51][1] == 1
        reopened = pickle.loads(pickle.dumps(folder_set))  # a spawn-started worker opens the map again rather than receive the pixels
        assert len(pickle.dumps(folder_set)) < 20000 and reopened[102][1] == 1


@pytest.mark.parametrize('method', ['logitnorm', 'oe', 'cutmix', 'pixmix'])
def test_plugin_methods_train_with_and_without_sio(runs, tmp_path, method):
    extra = ['--lr', '0.01'] if method == 'logitnorm' else []  # 1/tau = 25 multiplies the small CNN's logit gradients
    if method == 'oe':  # outliers as a folder of images of another size (resized on load)
        from PIL import Image
        (tmp_path / 'ood').mkdir()
        for i in range(10):
            Image.fromarray(np.random.RandomState(i).randint(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / 'ood' / f'{i}.png')
        extra = ['--oe-data', str(tmp_path / 'ood')]
    if method == 'pixmix':  # fractals larger than the digits, and one picture that is not square: resized and cropped on load
        from PIL import Image
        generate.main(['fractals', '--out', str(tmp_path / 'mix'), '--count', '5', '--size', '20'])
        Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / 'mix' / 'wide.png')
        extra = ['--mixing-set', str(tmp_path / 'mix')]
    for synthetic in ([], ['--synthetic', str(runs / 'syn')]):
        out = tmp_path / f'{method}{len(synthetic)}'
        train_sio.main(['--dataset', 'digits', '--method', method, '--epochs', '6', '--out', str(out)] + extra + synthetic)
        log = [json.loads(l) for l in (out / 'log.jsonl').read_text().splitlines()]
        assert len(log) == 6 and np.isfinite(log[-1]['loss']) and max(r['val_acc'] for r in log) > 0.5
        assert torch.load(out / 'best.pt', weights_only=False)['args']['method'] == method
        recorded = torch.load(out / 'last.pt', weights_only=False)['run']  # what --resume compares: PixMix's flags only for PixMix,
        assert ('pixmix_k' in recorded) == (method == 'pixmix') and 'classes' not in recorded  # so older runs without them still resume


def test_aps_picks_the_setting_with_the_best_validation_auroc(runs, tmp_path):
    """--aps against a hand search over the cached outputs: EBO's T from APS_GRIDS by validation AUROC; val mode scores
    every set with the pick, sio mode keeps the ID test scores at T = 1 as the SIO code's evaluator did."""
    from PIL import Image
    rng = np.random.RandomState(0)
    (tmp_path / 'val_ood').mkdir()
    for i in range(30):
        Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / 'val_ood' / f'{i}.png')
    energy = lambda z, t: t * torch.logsumexp(torch.from_numpy(z).double() / t, 1).numpy()
    for mode in ('val', 'sio'):
        evaluate.main([str(runs / 'ce_s0'), '--detectors', 'ebo,knn', '--aps', mode, '--aps-ood', str(tmp_path / 'val_ood'),
                       '--cache', str(tmp_path / 'cache'), '--out', str(tmp_path / mode)])
        z = {split: np.load(tmp_path / 'cache' / 'ce_s0' / f'{split}.npz')['logits'] for split in ('val', 'id', 'aps_ood', 'digits6-9')}
        id_side = 'val' if mode == 'val' else 'id'
        aurocs = {t: evaluate.ood_metrics(energy(z[id_side], t if mode == 'val' else 1.0), energy(z['aps_ood'], t))['AUROC'] for t in (1.0, 10.0, 100.0, 1000.0)}
        best = max(aurocs.values())
        expected = [t for t, a in aurocs.items() if a == best][-1]
        picks = json.loads((tmp_path / mode / 'results.json').read_text())['_meta']['aps']
        assert picks['mode'] == mode and picks['picks']['ce_s0']['ebo']['ebo_temperature'] == expected, (aurocs, picks)
        assert picks['picks']['ce_s0']['ebo']['val_auroc'] == pytest.approx(best, abs=1e-3) and picks['picks']['ce_s0']['knn']['knn_k'] == 50
        with np.load(tmp_path / mode / 'scores.npz') as scores:
            assert np.allclose(scores['ce_s0/ebo/id'], energy(z['id'], expected if mode == 'val' else 1.0))
            assert np.allclose(scores['ce_s0/ebo/digits6-9'], energy(z['digits6-9'], expected))
    assert len(set(aurocs.values())) > 1  # the temperature matters here, so the search is tested


def test_evaluate_two_process_shards_give_the_same_table(runs, evaluated, tmp_path):
    codes, logs = two_ranks(evaluate.main, [runs / 'ce_s0', '--detectors', 'msp,ebo,odin,knn,vim', '--out', tmp_path / 'ddp'], tmp_path / 'logs')
    assert codes == [0, 0], logs
    sharded = json.loads((tmp_path / 'ddp' / 'results.json').read_text())
    single = json.loads((evaluated / 'cached1' / 'results.json').read_text())
    for det in ('msp', 'ebo', 'odin', 'knn', 'vim'):
        for row in ('digits6-9', 'far'):
            for metric in ('AUROC', 'FPR95', 'AUPR_IN'):
                assert sharded[det][row][metric] == pytest.approx(single[det][row][metric], abs=1e-6), (det, row, metric)


def test_train_oal_two_processes(runs, oal_outliers, tmp_path):
    codes, logs = two_ranks(train_oal.main, oal_args(runs, oal_outliers, tmp_path / 'ddp', '--epochs', '2', '--club', 'alternating'), tmp_path / 'logs')
    assert codes == [0, 0], logs
    log = [json.loads(l) for l in (tmp_path / 'ddp' / 'log.jsonl').read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(r['loss']) for r in log)
    assert torch.load(tmp_path / 'ddp' / 'best.pt', weights_only=False)['val_acc'] > 0.5


# ================================================================================================
# Runs and folders: one writer per folder, nothing lost at any kill, nothing foreign touched

@pytest.fixture(autouse=True)
def release_folder_locks():
    """main() keeps its folder locks for the life of the process; tests run many mains in one process."""
    yield
    for name in ('train_sio', 'train_oal', 'generate', 'evaluate'):
        module = sys.modules.get(name)
        for handle in getattr(module, 'HELD_LOCKS', {}).values():
            handle.close()
        getattr(module, 'HELD_LOCKS', {}).clear()
        for lock, _ in getattr(module, 'CLAIMED', {}).values():
            lock.close()
        getattr(module, 'CLAIMED', {}).clear()


def killed_after_write(n, main, argv):
    """main(argv) in a forked child that SIGKILLs itself right after its n-th os.replace; True if it was killed."""
    import multiprocessing
    import signal

    def child():
        torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (it would hang)
        real_replace, count = os.replace, [0]

        def replace_then_die(src, dst):
            real_replace(src, dst)
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace_then_die
        main(argv)
    process = multiprocessing.get_context('fork').Process(target=child)
    process.start()
    process.join()
    assert process.exitcode in (0, -9), process.exitcode
    return process.exitcode == -9


def crash_points(main, argv, rerun_argv, out):
    """Kill a run after each of its file writes in turn, finish it with rerun_argv; yields the finished folder each time."""
    import shutil
    n = 1
    while True:
        shutil.rmtree(out, ignore_errors=True)
        if not killed_after_write(n, main, argv):
            return
        main(rerun_argv)
        yield n
        n += 1


@pytest.fixture
def one_thread():
    """The forked children run on one thread (see killed_after_write); so must the runs compared with them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trainers_finish_identically_after_a_kill_at_any_write(runs, oal_outliers, tmp_path, one_thread, monkeypatch):
    for main, argv in ((train_sio.main, ['--dataset', 'digits', '--epochs', '2', '--seed', '5']),
                       (train_oal.main, oal_args(runs, oal_outliers, tmp_path / 'unused', '--epochs', '2', '--seed', '5'))):
        writes, real_replace = [], os.replace
        monkeypatch.setattr(os, 'replace', lambda src, dst: (real_replace(src, dst), writes.append(Path(dst).name)))
        main(argv + ['--out', str(tmp_path / 'straight')])
        monkeypatch.setattr(os, 'replace', real_replace)
        straight = torch.load(tmp_path / 'straight' / 'last.pt', weights_only=False)
        straight_log = [json.loads(l)['val_acc'] for l in (tmp_path / 'straight' / 'log.jsonl').read_text().splitlines()]
        out = tmp_path / 'crashed'
        points = 0
        for points in crash_points(main, argv + ['--out', str(out), '--resume'], argv + ['--out', str(out), '--resume'], out):
            state = torch.load(out / 'last.pt', weights_only=False)
            assert all(torch.equal(straight['model'][k], state['model'][k]) for k in state['model']), points
            assert [json.loads(l)['val_acc'] for l in (out / 'log.jsonl').read_text().splitlines()] == straight_log, points
            assert sorted(p.name for p in out.iterdir()) == ['.lock', 'best.pt', 'last.pt', 'log.jsonl', 'manifest.json'], points
        assert points == len(writes) >= 5, writes  # every write of the uninterrupted run: best (when it improves), last, log per epoch
        import shutil
        shutil.rmtree(tmp_path / 'straight')


def test_sio_set_finishes_byte_identical_after_a_kill_at_any_write(tiny_pipeline, tmp_path, one_thread):
    straight, out = tmp_path / 'straight', tmp_path / 'crashed'
    generate.main(sio_args(tiny_pipeline, straight, '--per-class', '1'))
    points = 0
    for points in crash_points(generate.main, sio_args(tiny_pipeline, out, '--per-class', '1'), sio_args(tiny_pipeline, out, '--per-class', '1'), out):
        names = sorted(str(p.relative_to(out)) for p in out.rglob('*') if p.is_file() and p.name != '.lock')
        assert names == sorted(str(p.relative_to(straight)) for p in straight.rglob('*') if p.is_file() and p.name != '.lock'), points
        assert all((out / n).read_bytes() == (straight / n).read_bytes() for n in names), points
    assert points == 2 + 6 + 2 + 3 + 1  # manifest (claim, entries), 6 images, done after each of 2 batches, images.npy,
    # labels.npy, meta.json, the completion record


def test_oal_outliers_finish_byte_identical_after_a_kill_at_any_write(tiny_pipeline, runs, tmp_path, one_thread):
    def argv(out):
        return ['oal', '--pipeline', str(tiny_pipeline), '--teacher', str(runs / 'ce_s0'), '--dataset', 'digits', '--out', str(out),
                '--iterations', '2', '--samples-per-iteration', '1', '--steps', '2', '--features-per-class', '40', '--knn-k', '10',
                '--knn-draws', '50', '--boundary', '5', '--repeats', '2']
    straight, out = tmp_path / 'straight', tmp_path / 'crashed'
    generate.main(argv(straight))
    points = 0
    for points in crash_points(generate.main, argv(out), argv(out), out):
        names = sorted(str(p.relative_to(out)) for p in out.rglob('*') if p.is_file() and p.name != '.lock')
        assert names == sorted(str(p.relative_to(straight)) for p in straight.rglob('*') if p.is_file() and p.name != '.lock'), points
        assert all((out / n).read_bytes() == (straight / n).read_bytes() for n in names), points
    assert points == 4 + 2 * 2 + 1 + 3  # manifest (claim, entries), knn_outliers, knn_meta; an image and a latent per iteration;
    # done after the one call; diffusion_outliers, meta, the completion record

def test_one_process_per_output_folder(tiny_pipeline, tmp_path, capsys):
    import fcntl
    out = tmp_path / 'run'
    out.mkdir()
    with open(out / '.lock', 'w') as other:  # another process's lock (an open file description of its own)
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write('4242')
        other.flush()
        error = main_error(capsys, train_sio.main, '--dataset', 'digits', '--epochs', '1', '--out', out)
        assert 'in use by another process (pid 4242)' in error
        assert 'pid 4242' in main_error(capsys, generate.main, 'sio', '--pipeline', tiny_pipeline, '--dataset', 'digits', '--out', out)
    train_sio.main(['--dataset', 'digits', '--epochs', '1', '--out', str(out)])  # released on close, as the OS does on any exit or kill
    assert (out / 'best.pt').exists()


def test_a_killed_process_releases_its_folder(tmp_path, capsys):
    import signal
    import time
    proc = subprocess.Popen([sys.executable, str(REPO / 'train_sio.py'), '--dataset', 'digits', '--epochs', '200', '--out', str(tmp_path / 'run')],
                            env=OFFLINE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / 'run' / 'last.pt').exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    error = main_error(capsys, train_sio.main, '--dataset', 'digits', '--epochs', '200', '--resume', '--out', tmp_path / 'run')
    assert f'in use by another process (pid {proc.pid})' in error
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train_sio.main(['--dataset', 'digits', '--epochs', '200', '--resume', '--stop-after', '1', '--out', str(tmp_path / 'run')])
    rows = [json.loads(l)['epoch'] for l in (tmp_path / 'run' / 'log.jsonl').read_text().splitlines()]
    assert rows == list(range(1, len(rows) + 1)) and len(rows) >= 2


def test_overwrite_keeps_the_old_run_until_the_new_one_replaces_it_at_any_kill(tmp_path, one_thread):
    """--overwrite killed after any write: every file of the old run is still there (old or new bytes, never gone), a
    --resume never takes the old run's last.pt, and it ends with the weights of an uninterrupted run and nothing old."""
    import shutil
    new = ['--dataset', 'digits', '--epochs', '2', '--seed', '5', '--lr', '0.02']
    train_sio.main(new + ['--out', str(tmp_path / 'straight')])
    straight = torch.load(tmp_path / 'straight' / 'last.pt', weights_only=False)['model']
    train_sio.main(['--dataset', 'digits', '--epochs', '3', '--seed', '5', '--out', str(tmp_path / 'old')])  # other settings
    old_files = {p.name for p in (tmp_path / 'old').iterdir()}
    points = 0
    while True:
        shutil.rmtree(tmp_path / 'run', ignore_errors=True)
        shutil.copytree(tmp_path / 'old', tmp_path / 'run')
        if not killed_after_write(points + 1, train_sio.main, new + ['--overwrite', '--out', str(tmp_path / 'run')]):
            break
        points += 1
        assert old_files <= {p.name for p in (tmp_path / 'run').iterdir()}, points
        train_sio.main(new + ['--resume', '--out', str(tmp_path / 'run')])
        state = torch.load(tmp_path / 'run' / 'last.pt', weights_only=False)
        assert state['epoch'] == 2 and all(torch.equal(straight[k], state['model'][k]) for k in straight), points
        manifest = json.loads((tmp_path / 'run' / 'manifest.json').read_text())
        assert manifest['complete'] and manifest['stale'] == [] and manifest['settings']['--lr'] == 0.02, points
    assert points >= 6  # the manifest, best, last and log of each epoch, the un-staling, the completion record


def test_interrupts_are_one_line_with_the_command_that_continues(tmp_path):
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / f'run{int(sig)}'
        proc = subprocess.Popen([sys.executable, str(REPO / 'train_sio.py'), '--dataset', 'digits', '--epochs', '200',
                                 '--out', str(out)], env=OFFLINE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not (out / 'log.jsonl').exists():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1]
        lines = [l for l in err.replace('\r', '\n').splitlines() if l.startswith(('interrupted', 'error', 'Traceback'))]
        assert proc.returncode == 130 and len(lines) == 1 and 'Traceback' not in err, err[-2000:]
        kept, command = lines[0].split('; continue with: ')
        epoch = int(kept.split('holds epoch ')[1].split()[0])
        assert kept.startswith(f'interrupted: {out}/last.pt holds epoch') and command.startswith('python train_sio.py ')
        train_sio.main(command.split()[2:] + ['--stop-after', '1'])  # the printed command continues where it stopped
        assert json.loads((out / 'log.jsonl').read_text().splitlines()[-1])['epoch'] in (epoch + 1, epoch + 2)
    for script in SCRIPTS:  # Ctrl-C while torch loads, before main(): one line too
        proc = subprocess.Popen([sys.executable, str(REPO / script), '--help'], env=OFFLINE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        while 'numpy' not in Path(f'/proc/{proc.pid}/maps').read_text():  # past the handler, into the libraries
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode == 130 and err.split() and 'Traceback' not in err and 'interrupted' in err, err[-2000:]


def test_overwrite_replaces_only_this_scripts_files(runs, tiny_pipeline, sio_samples, tmp_path, capsys):
    import shutil
    shutil.copytree(runs / 'ce_s0', tmp_path / 'run')
    assert '--overwrite' in main_error(capsys, train_sio.main, '--dataset', 'digits', '--epochs', '1', '--out', tmp_path / 'run')
    train_sio.main(['--dataset', 'digits', '--epochs', '1', '--overwrite', '--out', str(tmp_path / 'run')])
    assert len((tmp_path / 'run' / 'log.jsonl').read_text().splitlines()) == 1
    # a set with other settings: --overwrite starts afresh; a set that produced nothing takes the new settings without it
    shutil.copytree(sio_samples, tmp_path / 'set')
    generate.main(sio_args(tiny_pipeline, tmp_path / 'set', '--prompt', 'a drawing of a {}', '--overwrite'))
    assert json.loads((tmp_path / 'set' / 'meta.json').read_text())['prompt_template'] == 'a drawing of a {}'
    (tmp_path / 'refused').mkdir()  # left by a run refused before its first image
    (tmp_path / 'refused' / 'manifest.json').write_text(json.dumps(dict(script='generate.py sio', settings=dict(seed=9), files=['000/'],
                                                                         stale=[], done=[], complete=False)))
    generate.main(sio_args(tiny_pipeline, tmp_path / 'refused'))
    assert json.loads((tmp_path / 'refused' / 'meta.json').read_text())['complete']
    # fit: a pipeline it made is replaced only on request, and only once the new one is complete
    shutil.copytree(tiny_pipeline, tmp_path / 'pipe')
    fit_args = ['fit', '--dataset', 'digits', '--out', str(tmp_path / 'pipe'), '--steps', '2', '--vae-steps', '2', '--check-per-class', '1']
    assert '--overwrite' in main_error(capsys, generate.main, *fit_args)
    generate.main(fit_args + ['--overwrite'])
    assert json.loads((tmp_path / 'pipe' / 'fit.json').read_text())['args']['steps'] == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] and not list((tmp_path / 'pipe').glob('.[bo]*'))


def test_a_file_no_manifest_names_is_never_replaced_or_deleted(runs, tiny_pipeline, sio_samples, tmp_path, capsys):
    """Ownership is by the manifest's names, at any depth: a user's file inside a set's class folder or a pipeline's
    unet/, or named like a picture of ours but outside the run's range, makes the folder refused; a manifest
    entry pointing outside the folder removes nothing there."""
    import shutil
    shutil.copytree(sio_samples, tmp_path / 'set')
    per_class = json.loads((sio_samples / 'meta.json').read_text())['per_class']
    for name in ('NOTES.txt', 'extra_by_user.png', f'{per_class}.png', f'0{per_class - 1}.png'):
        shutil.copy(tmp_path / 'set' / '000' / '0.png', tmp_path / 'set' / '000' / name)
        before = snapshot(tmp_path / 'set')
        assert f'000/{name}' in main_error(capsys, generate.main, *sio_args(tiny_pipeline, tmp_path / 'set'), '--overwrite')
        assert snapshot(tmp_path / 'set') == before
        (tmp_path / 'set' / '000' / name).unlink()
    shutil.copytree(tiny_pipeline, tmp_path / 'pipe')
    (tmp_path / 'pipe' / 'unet' / 'README_mine.txt').write_text('mine')
    fit = ['fit', '--dataset', 'digits', '--out', tmp_path / 'pipe', '--steps', '1', '--vae-steps', '1', '--overwrite']
    assert 'unet/README_mine.txt' in main_error(capsys, generate.main, *fit)
    assert (tmp_path / 'pipe' / 'unet' / 'README_mine.txt').read_text() == 'mine'
    generate.main(['fractals', '--out', str(tmp_path / 'fractals'), '--count', '12', '--size', '16'])
    shutil.copy(tmp_path / 'fractals' / '00000.png', tmp_path / 'fractals' / '00012.png')  # one past the range
    assert '00012.png' in main_error(capsys, generate.main, 'fractals', '--out', tmp_path / 'fractals', '--count', '12',
                                     '--size', '16')
    shutil.copytree(runs / 'ce_s0', tmp_path / 'run')
    (tmp_path / 'victim').mkdir()
    (tmp_path / 'victim' / 'data.txt').write_text('precious')
    manifest = json.loads((tmp_path / 'run' / 'manifest.json').read_text())
    (tmp_path / 'run' / 'manifest.json').write_text(json.dumps(dict(manifest, files=manifest['files'] + ['../victim/'])))
    train_sio.main(['--dataset', 'digits', '--epochs', '1', '--out', str(tmp_path / 'run'), '--overwrite'])
    assert (tmp_path / 'victim' / 'data.txt').read_text() == 'precious'
    assert json.loads((tmp_path / 'run' / 'manifest.json').read_text())['files'] == ['best.pt', 'last.pt', 'log.jsonl']


def test_copies_beside_outliers_nested_outputs_and_busy_seeds_are_refused_untouched(runs, tiny_pipeline, oal_outliers,
                                                                                     tmp_path, capsys):
    """A user's copy of an outlier picture is no picture of ours; an output folder inside another script's is refused
    (fit's --overwrite would clear its scratch folder); a busy seed folder refuses the command before another seed's
    folder is made or touched; two seeds naming one folder through a link are refused."""
    import fcntl
    import shutil
    shutil.copytree(oal_outliers, tmp_path / 'oal')
    picture = sorted((tmp_path / 'oal' / 'images').iterdir())[0]
    shutil.copy(picture, picture.with_name(picture.stem + ' copy.png'))
    before = snapshot(tmp_path / 'oal')
    argv = ['oal', '--pipeline', tiny_pipeline, '--teacher', runs / 'ce_s0', '--dataset', 'digits', '--out', tmp_path / 'oal',
            '--iterations', '3', '--samples-per-iteration', '2', '--steps', '2', '--features-per-class', '40', '--knn-k', '10',
            '--knn-draws', '50', '--boundary', '5', '--repeats', '2']
    assert 'copy.png' in main_error(capsys, generate.main, *argv) and snapshot(tmp_path / 'oal') == before
    shutil.copytree(tiny_pipeline, tmp_path / 'pipe')
    assert 'an output folder of its own' in main_error(capsys, generate.main, 'fractals', '--out', tmp_path / 'pipe' / '.building',
                                                        '--count', '2', '--size', '16')
    assert not (tmp_path / 'pipe' / '.building').exists()
    shutil.copytree(runs / 'ce_s1', tmp_path / 's1')
    for made in (False, True):  # seed 0's folder absent, then a finished run that --overwrite would restart
        if made:
            shutil.copytree(runs / 'ce_s0', tmp_path / 's0')
        before = snapshot(tmp_path / 's0')
        with open(tmp_path / 's1' / '.lock', 'r+') as held:  # another process writing seed 1
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert 'in use by another process' in main_error(capsys, train_sio.main, '--dataset', 'digits', '--epochs', '3',
                                                             '--seed', '0,1', '--out', tmp_path / 's{seed}', '--overwrite')
        assert (tmp_path / 's0').exists() == made and snapshot(tmp_path / 's0') == before
    (tmp_path / 'linked').mkdir()
    (tmp_path / 'linked' / 's1').symlink_to('s0')
    (tmp_path / 'linked' / 's0').mkdir()
    assert 'names one folder' in main_error(capsys, train_sio.main, '--dataset', 'digits', '--epochs', '1', '--seed', '0,1',
                                            '--out', tmp_path / 'linked' / 's{seed}')


def test_resume_refuses_a_retrained_teacher_or_a_set_made_again(runs, tiny_pipeline, oal_outliers, tmp_path, capsys):
    import shutil
    shutil.copytree(runs / 'ce_s0', tmp_path / 'teacher')
    train_oal.main(oal_args(runs, oal_outliers, tmp_path / 'oal', '--epochs', '2', '--stop-after', '1', '--teacher',
                            tmp_path / 'teacher'))
    shutil.copy(runs / 'ce_s1' / 'best.pt', tmp_path / 'teacher' / 'best.pt')  # the teacher trained again
    assert 'teacher_stamp' in main_error(capsys, train_oal.main, *oal_args(runs, oal_outliers, tmp_path / 'oal', '--epochs',
                                                                          '2', '--resume', '--teacher', tmp_path / 'teacher'))
    shutil.copytree(tiny_pipeline, tmp_path / 'pipe')  # a set made again, as before, by a pipeline fitted again
    generate.main(sio_args(tmp_path / 'pipe', tmp_path / 'set'))
    sio = ['--dataset', 'digits', '--synthetic', tmp_path / 'set', '--epochs', '2', '--out', tmp_path / 'sio']
    train_sio.main([str(a) for a in sio + ['--stop-after', '1']])
    generate.main(fit_args(tmp_path / 'pipe', '--seed', '7', '--overwrite'))
    generate.main(sio_args(tmp_path / 'pipe', tmp_path / 'set', '--overwrite'))
    assert 'made_with' in main_error(capsys, train_sio.main, *sio, '--resume')


def test_resume_checks_every_seed_first_and_a_folder_run_keeps_its_classes_and_workers(runs, tmp_path, capsys):
    """A damaged last.pt of a later seed stops the command before an earlier seed trains, naming that seed alone;
    a folder run resumed with another class list (labels are positions in it) or worker count is refused."""
    from PIL import Image
    seeds = ['--dataset', 'digits', '--epochs', '3', '--seed', '0,1', '--out', tmp_path / 's{seed}']
    train_sio.main([str(a) for a in seeds + ['--stop-after', '1']])
    (tmp_path / 's1' / 'last.pt').write_bytes((tmp_path / 's1' / 'last.pt').read_bytes()[:1000])
    before = snapshot(tmp_path / 's0')
    error = main_error(capsys, train_sio.main, *seeds, '--resume')
    assert 's1/last.pt' in error and '--overwrite --seed 1' in error and snapshot(tmp_path / 's0') == before
    images, labels = digits_train_set()
    for split in ('train', 'val'):
        for c in range(3):
            (tmp_path / 'ds' / split / f'c{c}').mkdir(parents=True)
            for i in np.flatnonzero(labels == c)[:4]:
                Image.fromarray(images[i]).save(tmp_path / 'ds' / split / f'c{c}' / f'{i}.png')
    (tmp_path / 'classes.txt').write_text('c0\nc1\n')
    run = ['--dataset', f'folder:{tmp_path / "ds"}', '--classes', tmp_path / 'classes.txt', '--arch', 'cnn', '--image-size', '8',
           '--epochs', '2', '--batch-size', '4', '--out', tmp_path / 'folder_run']
    train_sio.main([str(a) for a in run + ['--workers', '0', '--stop-after', '1']])
    error = main_error(capsys, train_sio.main, *run, '--workers', '1', '--resume')
    assert '--workers 0 -> 1' in error and error.endswith('keep its settings, pass --overwrite to start afresh, or pass '
                                                          'another --out')
    (tmp_path / 'classes.txt').write_text('c0\nc2\n')
    assert "'c1', 'c0', 'c2'" not in (error := main_error(capsys, train_sio.main, *run, '--workers', '0', '--resume'))
    assert "class_list ['c0', 'c1'] -> ['c0', 'c2']" in error


def test_an_interrupt_repeats_the_command_as_given_until_something_is_kept(tmp_path, monkeypatch, capsys):
    argv = ['sio', '--out', str(tmp_path / 'x'), '--overwrite']
    script = os.path.relpath(generate.__file__)
    for kept, command in (('', argv), ('3 of 9 images in x', argv[:-1])):
        with pytest.raises(SystemExit) as stop, generate.user_errors(argv, drop=('--overwrite',)):
            generate.STATUS['kept'] = kept
            raise KeyboardInterrupt
        said = f"interrupted: {kept or 'nothing was written'}; continue with: python {script} "
        assert stop.value.code == 130 and capsys.readouterr().err.strip() == said + ' '.join(command)
    (tmp_path / 'x').mkdir()  # once --overwrite has taken a folder, it is unfinished and continues without the flag
    with pytest.raises(SystemExit), generate.user_errors(argv, drop=('--overwrite',)):
        generate.claim(tmp_path / 'x', '--out', 'generate.py sio', {}, True, True, 'a set', 'pass --overwrite')
        raise KeyboardInterrupt
    assert capsys.readouterr().err.strip().endswith(f"(--overwrite began it afresh); continue with: python {script} "
                                                    + ' '.join(argv[:-1]))
    monkeypatch.setenv('WORLD_SIZE', '2')  # under torchrun, the command is torchrun's
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    with pytest.raises(SystemExit), generate.user_errors(argv):
        raise KeyboardInterrupt
    assert f'continue with: torchrun --nproc_per_node=2 {script} sio' in capsys.readouterr().err


def test_refusals_leave_no_trace_and_nothing_outside_out_is_written(runs, tmp_path, capsys):
    """A refused command makes or locks no folder (every seed's folder is checked before the first is taken);
    a .lock or a link the user put in a folder refuses it; a refused --overwrite keeps the user's *.N.tmp files;
    an --near name cannot point outside the cache; odd paths and environments are one line."""
    import shutil
    (tmp_path / 'm2').mkdir()
    (tmp_path / 'm2' / 'notes.txt').write_text('mine')
    assert 'notes.txt' in main_error(capsys, train_sio.main, '--dataset', 'digits', '--epochs', '1', '--seed', '3,2',
                                     '--out', f'{tmp_path}/m{{seed}}')
    assert not (tmp_path / 'm3').exists() and sorted(p.name for p in (tmp_path / 'm2').iterdir()) == ['notes.txt']
    (tmp_path / 'lk').mkdir()
    (tmp_path / 'lk' / '.lock').write_text('my notes')
    assert '.lock' in main_error(capsys, generate.main, 'fractals', '--count', '1', '--size', '8', '--out', tmp_path / 'lk')
    (tmp_path / 'victim.txt').write_text('precious')
    (tmp_path / 'lk' / '.lock').unlink()
    (tmp_path / 'lk' / '.lock').symlink_to(tmp_path / 'victim.txt')
    assert '.lock' in main_error(capsys, generate.main, 'fractals', '--count', '1', '--size', '8', '--out', tmp_path / 'lk')
    for make in (lambda lock: os.mkfifo(lock), lambda lock: os.link(tmp_path / 'victim.txt', lock)):  # a pipe, a hard link
        (tmp_path / 'lk' / '.lock').unlink()
        make(tmp_path / 'lk' / '.lock')
        assert '.lock' in main_error(capsys, generate.main, 'fractals', '--count', '1', '--size', '8', '--out',
                                     tmp_path / 'lk')
    assert 'one folder' in main_error(capsys, train_sio.main, '--dataset', 'digits', '--seed', '0,1', '--out',
                                      f'{tmp_path}/x{{seed}}/..')
    generate.main(['fractals', '--count', '2', '--size', '8', '--out', str(tmp_path / 'done')])
    (tmp_path / 'done' / '00001.png').unlink()
    (tmp_path / 'done' / '00001.png').symlink_to(tmp_path / 'victim.txt')  # at a name the manifest records
    assert '00001.png' in main_error(capsys, generate.main, 'fractals', '--count', '2', '--size', '8', '--overwrite',
                                     '--out', tmp_path / 'done')
    (tmp_path / 'ui').mkdir()
    (tmp_path / 'sl').mkdir()
    (tmp_path / 'sl' / '00000.png').symlink_to(tmp_path / 'victim.txt')  # named as ours, but a link
    (tmp_path / 'sl' / 'folder').symlink_to(tmp_path / 'ui')
    error = main_error(capsys, generate.main, 'fractals', '--count', '1', '--size', '8', '--out', tmp_path / 'sl')
    assert '00000.png' in error and 'folder' in error and (tmp_path / 'victim.txt').read_text() == 'precious'
    shutil.copytree(runs / 'ce_s0', tmp_path / 'run')
    (tmp_path / 'run' / 'best.pt.42.tmp').write_text('my backup')
    assert 'other settings' in main_error(capsys, train_sio.main, '--dataset', 'digits', '--epochs', '1', '--out',
                                          tmp_path / 'run')
    assert (tmp_path / 'run' / 'best.pt.42.tmp').read_text() == 'my backup'
    assert (tmp_path / 'victim.txt').read_text() == 'precious'
    assert 'NAME' in main_error(capsys, evaluate.main, runs / 'ce_s0', '--near', f'../../victim={tmp_path / "ui"}',
                                '--cache', tmp_path / 'cache', '--out', tmp_path / 'e')
    (tmp_path / 'far').mkdir()
    os.mkfifo(tmp_path / 'far' / 'a.png')  # read, it would wait forever
    (tmp_path / 'far' / 'b.png').write_bytes(b'')  # found only when decoded: --out stays as it was
    (tmp_path / 'e').mkdir()
    assert 'b.png' in main_error(capsys, evaluate.main, runs / 'ce_s0', '--detectors', 'msp', '--far',
                                 f'x={tmp_path / "far"}', '--out', tmp_path / 'e')
    assert not list((tmp_path / 'e').iterdir())
    assert 'cannot be used' in main_error(capsys, train_sio.main, '--dataset', 'digits', '--out', tmp_path / ('a' * 300))
    (tmp_path / 'loop').symlink_to(tmp_path / 'loop')
    assert 'cannot be used' in main_error(capsys, train_sio.main, '--dataset', 'digits', '--out', tmp_path / 'loop')
    proc = subprocess.run([sys.executable, str(REPO / 'train_sio.py'), '--dataset', 'digits', '--epochs', '1', '--out',
                           str(tmp_path / 'ws')], env=dict(OFFLINE, WORLD_SIZE='abc'), capture_output=True, text=True,
                          timeout=300)
    assert_user_error(proc, 'WORLD_SIZE', 'torchrun')


def test_cache_follows_the_content_of_each_set(runs, tmp_path):
    from PIL import Image
    for name, seed in (('a', 0), ('b', 1)):  # two OOD folders of the same size under the same set name
        (tmp_path / name).mkdir()
        for i in range(20):
            Image.fromarray(np.random.RandomState(seed * 100 + i).randint(0, 256 if seed else 64, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name / f'{i}.png')
    def auroc(folder, cache):
        out = tmp_path / 'results'
        evaluate.main([str(runs / 'ce_s0'), '--detectors', 'msp', '--far', f'mine={tmp_path / folder}', '--out', str(out), '--overwrite']
                      + (['--cache', str(tmp_path / 'cache')] if cache else []))
        return json.loads((out / 'results.json').read_text())['msp']['mine']['AUROC']
    assert auroc('a', True) == auroc('a', False)
    assert auroc('b', True) == auroc('b', False) != auroc('a', False)  # the second set is not scored from the first one's outputs

# ================================================================================================
# Bad input: every row must end in one 'error:' line naming the fix, exit code 2, no traceback, and
# leave what was already in --out untouched.

@pytest.fixture(scope='session')
def bad(runs, tmp_path_factory):
    """Broken and mismatched inputs, each written by hand in the real on-disk format."""
    import shutil
    from PIL import Image
    root = tmp_path_factory.mktemp('bad')
    images, labels = digits_train_set()

    def class_folders(name, meta=None, skip_class=None):
        for c in range(6):
            (root / name / f'{c:03d}').mkdir(parents=True)
            for n, i in enumerate(np.flatnonzero(labels == c)[:2] if c != skip_class else []):
                Image.fromarray(images[i]).save(root / name / f'{c:03d}' / f'{n}.png')
        if meta is not None:
            (root / name / 'meta.json').write_text(json.dumps(meta))
        return root / name

    def npy_pair(name, image_array, label_array):
        (root / name).mkdir()
        np.save(root / name / 'images.npy', image_array, allow_pickle=True)
        np.save(root / name / 'labels.npy', label_array, allow_pickle=True)
        return root / name

    meta = dict(dataset='digits', classes=train_sio.DIGIT_NAMES[:6], counts=[2] * 6, complete=True)
    class_folders('syn_partial', dict(meta, counts=[2, 2, 0, 0, 0, 0], complete=False))
    class_folders('syn_other_classes', dict(meta, classes=list('abcdef')))
    class_folders('syn_other_dataset', dict(meta, dataset='cifar10'))
    class_folders('syn_missing_class', skip_class=3)
    (class_folders('syn_corrupt_png') / '002' / '1.png').write_bytes(b'\x89PNG\r\n\x1a\n cut short')
    (class_folders('syn_corrupt_meta') / 'meta.json').write_text('{"complete": tr')
    npy_pair('syn_nan_labels', images, np.where(labels == 2, np.nan, labels.astype(float)))
    npy_pair('syn_object_labels', images, np.array([str(l) for l in labels], dtype=object))
    npy_pair('syn_empty_images', np.zeros((6, 0, 0, 3), np.uint8), np.arange(6))
    data = (npy_pair('syn_truncated', images, labels) / 'images.npy').read_bytes()
    (root / 'syn_truncated' / 'images.npy').write_bytes(data[:len(data) // 2])
    (root / 'no_images').mkdir()
    (root / 'no_images' / 'readme.txt').write_text('not an image')

    data = (runs / 'ce_s0' / 'last.pt').read_bytes()
    (root / 'truncated.pt').write_bytes(data[:len(data) // 3])
    (root / 'empty.pt').write_bytes(b'')
    torch.save(torch.zeros(3), root / 'tensor.pt')
    state = torch.load(runs / 'sio_s0' / 'last.pt', weights_only=False)
    torch.save(dict(state, method='oal'), root / 'oal_method.pt')

    def outliers(name, knn, diff, meta=None):
        (root / name).mkdir()
        np.save(root / name / 'knn_outliers.npy', knn, allow_pickle=True)
        np.save(root / name / 'diffusion_outliers.npy', diff, allow_pickle=True)
        if meta is not None:
            (root / name / 'meta.json').write_text(json.dumps(meta))
    knn, diff = np.ones((6, 4, 128), np.float32), np.ones((4, 8), np.float32)
    outliers('out_ok', knn, diff)
    outliers('out_partial', knn, diff, dict(meta, complete=False))
    outliers('out_other_classes', knn, diff, dict(meta, classes=list('abcdef')))
    outliers('out_zero_per_class', knn[:, :0], diff)
    outliers('out_object', np.array([[['x'] * 128] * 4] * 6, dtype=object), diff)
    outliers('out_nan', knn, np.full((4, 8), np.nan, np.float32))
    outliers('out_truncated', knn, diff)
    data = (root / 'out_truncated' / 'knn_outliers.npy').read_bytes()
    (root / 'out_truncated' / 'knn_outliers.npy').write_bytes(data[:len(data) // 2])
    (root / 'settings_corrupt' / '000').mkdir(parents=True)  # a set with an image whose settings.json was damaged
    (root / 'settings_corrupt' / '000' / '0.png').write_bytes((root / 'syn_partial' / '000' / '0.png').read_bytes())
    (root / 'settings_corrupt' / 'settings.json').write_text('{"seed": ')
    (root / 'a_file').write_text('a file where a folder belongs')
    shutil.copytree(runs / 'ce_s0', root / 'run_ce')
    (root / 'teacher_last_only').mkdir()
    shutil.copy(runs / 'ce_s0' / 'last.pt', root / 'teacher_last_only')
    (root / 'foreign_set' / '000').mkdir(parents=True)
    shutil.copy(root / 'syn_partial' / '000' / '0.png', root / 'foreign_set' / '000' / '0.png')
    (root / 'foreign_outliers').mkdir()
    shutil.copy(root / 'out_ok' / 'knn_outliers.npy', root / 'foreign_outliers')
    for split in ('train', 'val'):  # an ImageNet-layout folder dataset whose classes are WordNet ids
        for wnid in ('n01440764', 'n02085620'):
            (root / 'wnid_dataset' / split / wnid).mkdir(parents=True)
            shutil.copy(root / 'syn_partial' / '000' / '0.png', root / 'wnid_dataset' / split / wnid / 'a.png')
    (root / 'results_done').mkdir()  # a finished evaluation
    (root / 'results_done' / 'results.json').write_text('{}')
    (root / 'results_done' / 'manifest.json').write_text(json.dumps(dict(
        script='evaluate.py', settings={}, files=['results.json'], stale=[], done=[], complete=True)))
    (root / 'one_class.txt').write_text('n01440764\n')
    (root / 'unknown_class.txt').write_text('n01440764\nn09999999\n')
    # evaluate.py
    shutil.copytree(runs / 'ce_s0', root / 'run_unfinished')  # as a trainer leaves it while it still runs
    manifest = json.loads((root / 'run_unfinished' / 'manifest.json').read_text())
    (root / 'run_unfinished' / 'manifest.json').write_text(json.dumps(dict(manifest, complete=False)))
    ckpt = torch.load(runs / 'ce_s0' / 'best.pt', weights_only=False)
    torch.save(dict(ckpt, model=dict(ckpt['model'], **{'fc.bias': torch.full((6,), float('nan'))})), root / 'nan.pt')
    torch.save(dict(ckpt, model={k: v.long() for k, v in ckpt['model'].items()}), root / 'int_weights.pt')
    torch.save(dict(ckpt, arch='resnet18'), root / 'wrong_arch.pt')
    torch.save(dict(ckpt, model={k: v for k, v in ckpt['model'].items() if k != 'fc.bias'}), root / 'no_fc_bias.pt')
    torch.save(dict(ckpt, image_size=True), root / 'bool_size.pt')
    torch.save(dict(ckpt, image_size=10 ** 6), root / 'huge_size.pt')
    torch.save(dict(ckpt, std=(0.0, 0.0, 0.0)), root / 'zero_std.pt')
    torch.save(dict(ckpt, std=(float('inf'), 1.0, 1.0)), root / 'inf_std.pt')
    torch.save(dict(ckpt, classes=ckpt['classes'][:3]), root / 'three_names.pt')  # 6 outputs, 3 class names
    torch.save(ckpt['model'], root / 'foreign.ckpt')  # a state_dict, as OpenOOD saves them, of no ResNet
    for seed, size in ((0, 8), (1, 16)):  # --init runs of two sizes: one student size would not fit both
        torch.save(dict(ckpt, image_size=size), root / f'init_s{seed}.pt')
    for size in (8, 16):  # folder runs of one class list at two sizes: each is scored at its own size or not at all
        torch.save(dict(ckpt, dataset='folder:moved', classes=list('abcdef'), image_size=size), root / f'folder{size}.pt')
    (root / 'openood_lists_only' / 'benchmark_imglist' / 'imagenet').mkdir(parents=True)
    for split in ('val', 'test'):
        (root / 'openood_lists_only' / 'benchmark_imglist' / 'imagenet' / f'{split}_imagenet.txt').write_text(
            'imagenet_1k/val/ILSVRC2012_val_00000001.JPEG 65\n')
    # generate.py
    manifest = dict(script='generate.py fit', settings={}, files=['model_index.json'], stale=[], done=[], complete=False)
    for name, changes in (('unfinished_pipe', {}), ('sio_manifest', dict(script='generate.py sio', complete=True)),
                          ('oal_manifest', dict(script='generate.py oal'))):
        (root / name).mkdir()
        (root / name / 'manifest.json').write_text(json.dumps(dict(manifest, **changes)))
        (root / name / 'model_index.json').write_text('{}')
    (root / 'manifest_corrupt').mkdir()
    (root / 'manifest_corrupt' / 'manifest.json').write_text('{"script": "generate.py ')
    run = json.loads((runs / 'ce_s0' / 'manifest.json').read_text())  # a finished run's manifest, one field damaged
    for name, changes in (('files_text', dict(files='best.pt')), ('files_numbers', dict(files=[1, 2])),
                          ('stale_null', dict(stale=None)), ('settings_list', dict(settings=[1])),
                          ('done_odd', dict(done=[[1]])), ('no_script', dict(script=None))):
        shutil.copytree(runs / 'ce_s0', root / f'manifest_{name}')
        (root / f'manifest_{name}' / 'manifest.json').write_text(json.dumps(dict(run, **changes)))
    (root / 'binary.txt').write_bytes(b'\xff\xfe\x00\x81 not text')
    (root / 'link_to_nothing').symlink_to(root / 'nothing')
    (root / 'link_to_ce_s0').symlink_to(runs / 'ce_s0')
    shutil.copytree(runs / 'ce_s0', root / 'seeds' / 's0')  # a finished run beside a seed folder that cannot be made
    (root / 'seeds' / 's1').symlink_to(root / 'nothing')
    for name, count in (('a', 1), ('b', 3)):  # a folder dataset whose class a has one image
        for split in ('train', 'val'):
            (root / 'small_classes' / split / name).mkdir(parents=True)
            for i in range(count):
                shutil.copy(root / 'syn_partial' / '000' / '0.png', root / 'small_classes' / split / name / f'{i}.png')
    return root


SIO = '--dataset digits --epochs 1 --out {out}'
OAL = '--dataset digits --teacher {runs}/ce_s0 --init {runs}/ce_s0 --outliers {bad}/out_ok --epochs 1 --out {out}'
GEN_SIO = 'sio --pipeline {pipe} --dataset digits --per-class 1 --steps 1 --out {out}'
GEN_OAL = 'oal --pipeline {pipe} --teacher {runs}/ce_s0 --dataset digits --iterations 1 --steps 1 --features-per-class 40 --knn-k 10 --boundary 5 --out {out}'
FIT = 'fit --dataset digits --steps 1 --vae-steps 1 --out {out}'
EVAL = '{runs}/ce_s0 --detectors msp,knn --out {out}'
RESUME_SIO = '--dataset digits --epochs 8 --synthetic {runs}/syn --resume --out {run:sio_s0}'
# (script, base + extra arguments, a word the error line must name); {out} = an empty folder, {user} = one with the user's
# notes.txt, {run:NAME[:FILE]} = a copy of runs/NAME, its last.pt replaced by bad/FILE
BAD_INPUTS = [
    ('train_sio', SIO + ' --epochs 0', '--epochs'),
    ('train_sio', SIO + ' --epochs -3', '--epochs'),
    ('train_sio', SIO + ' --epochs x', '--epochs'),  # argparse's own message
    ('train_sio', SIO + ' --batch-size 0', '--batch-size'),
    ('train_sio', SIO + ' --lr -1', '--lr'),
    ('train_sio', SIO + ' --lr 0', '--lr'),
    ('train_sio', SIO + ' --lr nan', '--lr'),
    ('train_sio', SIO + ' --lr inf', '--lr'),
    ('train_sio', SIO + ' --weight-decay -1', '--weight-decay'),
    ('train_sio', SIO + ' --synthetic {runs}/syn --alpha 0', '--alpha'),
    ('train_sio', SIO + ' --synthetic {runs}/syn --alpha 1.5', '--alpha'),
    ('train_sio', SIO + ' --synthetic {runs}/syn --alpha 0.01', 'real images in a batch'),
    ('train_sio', SIO + ' --stop-after 0', '--stop-after'),
    ('train_sio', SIO + ' --image-size 3', '--image-size'),
    ('train_sio', SIO + ' --seed -1', '--seed'),
    ('train_sio', SIO + ' --seed 0,1,0', 'distinct'),
    ('train_sio', SIO + ' --seed 0,1', '{seed}'),  # two runs cannot share one --out
    ('train_sio', SIO + ' --method logitnorm --tau 0', '--tau'),
    ('train_sio', SIO + ' --method oe --oe-data {bad}/no_images --oe-weight -1', '--oe-weight'),
    ('train_sio', SIO + ' --method oe --oe-data {bad}/no_images --oe-batch-size 0', '--oe-batch-size'),
    ('train_sio', SIO + ' --method oe --oe-data {bad}/no_images', 'no images found'),
    ('train_sio', SIO + ' --method oe', '--oe-data'),
    ('train_sio', SIO + ' --method pixmix', '--mixing-set'),
    ('train_sio', SIO + ' --method pixmix --mixing-set {bad}/no_images', 'no images found'),
    ('train_sio', SIO + ' --mixing-set {bad}/no_images', '--method pixmix'),
    ('train_sio', SIO + ' --method pixmix --mixing-set {bad}/no_images --aug-severity 11', '--aug-severity'),
    ('train_sio', SIO + ' --method pixmix --mixing-set {bad}/no_images --pixmix-k -1', '--pixmix-k'),
    ('train_sio', SIO + ' --method pixmix --mixing-set {bad}/no_images --pixmix-beta 0', '--pixmix-beta'),
    ('train_sio', SIO + ' --workers -1', '--workers'),
    ('train_sio', SIO + ' --device cudaX', '--device'),
    ('train_sio', SIO + ' --device cuda:99', '--device cuda:99'),
    ('train_sio', SIO + ' --arch vgg', '--arch'),
    ('train_sio', SIO + ' --dataset mnist', '--dataset'),
    ('train_sio', SIO + ' --synthetic {bad}/none', 'does not exist'),
    ('train_sio', SIO + ' --synthetic {bad}/syn_partial', 'unfinished'),
    ('train_sio', SIO + ' --synthetic {bad}/syn_other_classes', 'generated for classes'),
    ('train_sio', SIO + ' --synthetic {bad}/syn_other_dataset', '--dataset cifar10'),
    ('train_sio', SIO + ' --synthetic {bad}/syn_missing_class', 'no image for class 3'),
    ('train_sio', SIO + ' --synthetic {bad}/syn_corrupt_png', '1.png'),
    ('train_sio', SIO + ' --synthetic {bad}/syn_corrupt_meta', 'meta.json'),
    ('train_sio', SIO + ' --synthetic {bad}/syn_nan_labels', 'whole class indices'),
    ('train_sio', SIO + ' --synthetic {bad}/syn_object_labels', 'labels.npy'),
    ('train_sio', SIO + ' --synthetic {bad}/syn_empty_images', 'H, W >= 1'),
    ('train_sio', SIO + ' --synthetic {bad}/syn_truncated', 'images.npy'),
    ('train_sio', SIO + ' --out {bad}/a_file', 'is a file'),
    ('train_sio', SIO + ' --out /proc/synth-ood', 'cannot be written'),
    ('train_sio', SIO + ' --resume --overwrite', 'one of them'),
    ('train_sio', SIO.replace('{out}', '{run:ce_s0}'), 'keep its settings'),
    ('train_sio', SIO.replace('{out}', '{user}'), 'files this script did not write'),
    ('train_sio', SIO.replace('{out}', '{user}') + ' --overwrite', 'files this script did not write'),
    ('train_sio', RESUME_SIO.replace('sio_s0', 'sio_s0:truncated.pt'), 'cannot be read'),
    ('train_sio', RESUME_SIO.replace('sio_s0', 'sio_s0:empty.pt'), 'cannot be read'),
    ('train_sio', RESUME_SIO.replace('sio_s0', 'sio_s0:tensor.pt'), 'not a synth-ood checkpoint'),
    ('train_sio', RESUME_SIO.replace('sio_s0', 'sio_s0:oal_method.pt'), 'not a train_sio.py one'),
    ('train_sio', RESUME_SIO.replace(' --synthetic {runs}/syn', ''), '--synthetic'),
    ('train_sio', RESUME_SIO + ' --method logitnorm', '--method'),
    ('train_sio', RESUME_SIO + ' --epochs 9', '--epochs 8 -> 9'),
    ('train_sio', RESUME_SIO + ' --lr 0.1', '--lr'),
    ('train_sio', RESUME_SIO + ' --seed 1', '--seed'),
    ('train_oal', OAL + ' --epochs 0', '--epochs'),
    ('train_oal', OAL + ' --batch-size 0', '--batch-size'),
    ('train_oal', OAL + ' --batch-size 1', '--batch-size'),
    ('train_oal', OAL + ' --lr 0', '--lr'),
    ('train_oal', OAL + ' --lr-q -1', '--lr-q'),
    ('train_oal', OAL + ' --w-kd -1', '--w-kd'),
    ('train_oal', OAL + ' --w-feat nan', '--w-feat'),
    ('train_oal', OAL + ' --seed -1', '--seed'),
    ('train_oal', OAL + ' --seed 1,x', '--seed'),
    ('train_oal', OAL + ' --seed 1,2', '{seed}'),
    ('train_oal', OAL + ' --teacher-min-acc 1.5', '--teacher-min-acc'),
    ('train_oal', OAL + ' --image-size 4', '--image-size'),
    ('train_oal', OAL + ' --arch vgg', '--arch'),
    ('train_oal', OAL + ' --device cudaX', '--device'),
    ('train_oal', OAL + ' --teacher {bad}/truncated.pt', 'cannot be read'),
    ('train_oal', OAL + ' --teacher {bad}/tensor.pt', 'not a synth-ood checkpoint'),
    ('train_oal', OAL + ' --teacher {bad}/no_such_run', 'no such path'),
    ('train_oal', OAL + ' --teacher {bad}/teacher_last_only', 'no best.pt'),
    ('train_oal', OAL + ' --init {bad}/empty.pt', 'cannot be read'),
    ('train_oal', OAL + ' --outliers {bad}/out_truncated', 'knn_outliers.npy'),
    ('train_oal', OAL + ' --outliers {bad}/out_zero_per_class', 'M >= 1'),
    ('train_oal', OAL + ' --outliers {bad}/out_object', 'knn_outliers.npy'),
    ('train_oal', OAL + ' --outliers {bad}/out_nan', 'finite'),
    ('train_oal', OAL + ' --outliers {bad}/out_partial', 'unfinished'),
    ('train_oal', OAL + ' --outliers {bad}/out_other_classes', 'generated for classes'),
    ('train_oal', OAL + ' --out {bad}/a_file', 'is a file'),
    ('train_oal', OAL.replace('{out}', '{run:ce_s0}') + ' --resume', 'not a train_oal.py one'),
    ('generate', GEN_SIO + ' --per-class 0', '--per-class'),
    ('generate', GEN_SIO + ' --per-class -5', '--per-class'),
    ('generate', GEN_SIO + ' --batch-size 0', '--batch-size'),
    ('generate', GEN_SIO + ' --steps 0', '--steps'),
    ('generate', GEN_SIO + ' --steps -1', '--steps'),
    ('generate', GEN_SIO + ' --guidance nan', '--guidance'),
    ('generate', GEN_SIO + ' --max-batches 0', '--max-batches'),
    ('generate', GEN_SIO + ' --seed -1', '--seed'),
    ('generate', GEN_SIO + ' --device cudaX', '--device'),
    ('generate', GEN_SIO + ' --out {bad}/a_file', 'is a file'),
    ('generate', GEN_SIO + ' --out {bad}/settings_corrupt', 'did not write'),  # an old settings.json is no manifest of ours
    ('generate', GEN_SIO + ' --out {bad}/foreign_set', 'did not write'),
    ('generate', GEN_SIO + ' --dataset folder:{bad}/wnid_dataset', '--class-names'),
    ('train_sio', SIO + ' --classes imagenet-10', 'drop --classes'),
    ('train_sio', SIO.replace('digits', 'folder:{bad}/wnid_dataset') + ' --classes imagenet-10', '1,000 class folders'),
    ('train_sio', SIO.replace('digits', 'folder:{bad}/wnid_dataset') + ' --classes {bad}/no_such.txt', 'cannot be read'),
    ('train_sio', SIO.replace('digits', 'folder:{bad}/wnid_dataset') + ' --classes {bad}/one_class.txt', '2 or more'),
    ('train_sio', SIO.replace('digits', 'folder:{bad}/wnid_dataset') + ' --classes {bad}/unknown_class.txt', 'n09999999'),
    ('generate', GEN_SIO + ' --classes imagenet-10', 'drop --classes'),
    ('generate', 'fractals --out {out} --count 0', '--count'),
    ('evaluate', '{bad}/run_ce --aps-ood {bad}/no_images', '--aps sio'),
    ('evaluate', '{bad}/run_ce --aps val --aps-ood {bad}/no_images', 'validation OOD images'),
    ('evaluate', '{bad}/run_ce --aps val', '--aps-ood PATH'),
    ('evaluate', '{bad}/run_ce --ebo-temperature 0', '--ebo-temperature'),
    ('generate', 'fractals --out {out} --size 4', '--size'),
    ('generate', GEN_SIO + ' --class-names {bad}/none.txt', '--class-names'),  # the user's 000/0.png is not image 0 of a set
    ('generate', GEN_OAL + ' --out {bad}/foreign_outliers', 'did not write'),  # nor is a foreign knn_outliers.npy reused
    ('generate', GEN_OAL + ' --knn-k 0', '--knn-k'),
    ('generate', GEN_OAL + ' --teacher-min-acc -0.1', '--teacher-min-acc'),
    ('generate', GEN_OAL + ' --keep 0', '--keep'),
    ('generate', GEN_OAL + ' --features-per-class 5', '--features-per-class'),
    ('generate', GEN_OAL + ' --knn-sigma 0', '--knn-sigma'),
    ('generate', GEN_OAL + ' --iterations 0', '--iterations'),
    ('generate', GEN_OAL + ' --teacher {bad}/truncated.pt', 'cannot be read'),
    ('generate', GEN_OAL + ' --out {bad}/a_file', 'is a file'),
    ('generate', FIT + ' --steps 0', '--steps'),
    ('generate', FIT + ' --vae-steps 0', '--vae-steps'),
    ('generate', FIT + ' --unet-channels 16,x', '--unet-channels'),
    ('generate', FIT + ' --text-dim 3', '--text-dim'),
    ('generate', FIT + ' --prompt-dropout 1', '--prompt-dropout'),
    ('generate', FIT.replace('{out}', '{user}'), 'files this script did not write'),  # a folder of the user's files is never replaced
    ('generate', FIT.replace('{out}', '{user}') + ' --overwrite', 'files this script did not write'),
    ('generate', GEN_SIO.replace('{out}', '{user}'), 'files this script did not write'),
    ('generate', GEN_OAL.replace('{out}', '{user}') + ' --overwrite', 'files this script did not write'),
    ('evaluate', EVAL.replace('{out}', '{user}'), 'files this script did not write'),
    ('train_oal', OAL.replace('{out}', '{user}'), 'files this script did not write'),
    ('train_oal', OAL.replace('{out}', '{runs}/ce_s0'), 'is the --teacher run'),
    ('train_oal', OAL.replace('{out}', '{run:sio_s0}') + ' --overwrite', 'not a train_oal.py one'),
    ('evaluate', EVAL + ' --knn-k 0', '--knn-k'),
    ('evaluate', EVAL + ' --knn-k 5000', '--knn-k'),
    ('evaluate', EVAL + ' --batch-size 0', '--batch-size'),
    ('evaluate', EVAL + ' --react-percentile 150', '--react-percentile'),
    ('evaluate', EVAL + ' --ash-percentile 0', '--ash-percentile'),
    ('evaluate', EVAL + ' --dice-percentile nan', '--dice-percentile'),
    ('evaluate', EVAL + ' --odin-temperature 0', '--odin-temperature'),
    ('evaluate', EVAL + ' --detectors vim --vim-dim 500', '--vim-dim'),
    ('evaluate', EVAL + ' --detectors foo', 'unknown detector'),
    ('evaluate', EVAL + ' --device cudaX', '--device'),
    ('evaluate', EVAL + ' --out {bad}/a_file', 'is a file'),
    ('evaluate', EVAL + ' --out {bad}/results_done', 'earlier evaluation'),
    ('evaluate', EVAL + ' --cache {bad}/a_file', 'is a file'),
    ('evaluate', EVAL.replace('ce_s0', 'none'), 'neither a run directory'),
]


BAD_INPUTS_GENERATE = [  # generate.py: more kinds of bad input
    ('generate', GEN_SIO + ' --prompt a_{{{{}}}}', '--prompt'),  # {{}} is a literal {}: no field left
    ('generate', GEN_SIO + ' --prompt a_{{}}_and_{{}}', '--prompt'),
    ('generate', GEN_SIO + ' --prompt a_{{name}}', '--prompt'),
    ('generate', GEN_SIO + ' --prompt a_{{', '--prompt'),
    ('generate', GEN_SIO + ' --prompt a_photo', '--prompt'),
    ('generate', GEN_SIO + ' --per-class', '--per-class'),
    ('generate', GEN_SIO + ' --bogus 1', 'unrecognized'),
    ('generate', '--out {out}', 'command'),
    ('generate', GEN_SIO + ' --seed 2147483648', '--seed'),
    ('generate', GEN_SIO + ' --guidance -1', '--guidance'),
    ('generate', GEN_SIO + ' --steps 1001', '--steps'),
    ('generate', GEN_SIO + ' --scheduler euler', '--scheduler'),
    ('generate', GEN_SIO + ' --dtype fp8', '--dtype'),
    ('generate', GEN_SIO + ' --device cuda:99', '--device'),
    ('generate', GEN_SIO + ' --dataset folder:{bad}/none', 'does not exist'),
    ('generate', GEN_SIO + ' --dataset cifar10 --data-root {out}/data', '--data-root'),
    ('generate', GEN_SIO + ' --pipeline {bad}/unfinished_pipe', 'unfinished'),
    ('generate', GEN_SIO + ' --pipeline {bad}/a_file', 'is a file'),
    ('generate', GEN_SIO + ' --pipeline {bad}/no_pipeline', 'does not exist'),
    ('generate', GEN_SIO + ' --pipeline {bad}/syn_partial', 'cannot load'),
    ('generate', GEN_SIO + ' --pipeline {bad}/sio_manifest', 'not a pipeline'),
    ('generate', GEN_SIO + ' --pipeline {bad}/manifest_corrupt', 'manifest.json'),
    ('generate', GEN_SIO + ' --class-names {bad}/binary.txt', 'cannot be read'),
    ('generate', GEN_SIO + ' --class-names {bad}/no_images', 'is a folder'),
    ('generate', GEN_SIO + ' --out {bad}/manifest_corrupt', 'manifest.json'),
    ('generate', GEN_SIO + ' --out {bad}/oal_manifest', 'generate.py oal'),
    ('generate', GEN_SIO.replace('{out}', '{run:ce_s0}'), 'train_sio.py'),
    ('generate', GEN_SIO.replace('{out}', '{pipe}'), 'is the --pipeline folder'),
    ('generate', GEN_SIO.replace('{out}', '{pipe}/set'), 'lies in the --pipeline folder'),
    ('generate', GEN_SIO + ' --per-class 100000000000000', 'GiB'),  # more than the disk holds
    ('generate', GEN_SIO + ' --batch-size 100000000', 'GiB'),  # more than the memory holds
    ('generate', GEN_OAL + ' --prompt the_{{}}_{{}}', '--prompt'),
    ('generate', GEN_OAL + ' --boundary 120 --features-per-class 150', 'training images'),  # a digit class has ~106
    ('generate', GEN_OAL + ' --dataset folder:{bad}/small_classes', 'class a has 1 training images'),
    ('generate', GEN_OAL + ' --knn-draws 100000000000', 'GiB'),
    ('generate', GEN_OAL + ' --iterations 100000000000', 'GiB'),
    ('generate', GEN_OAL + ' --knn-draws 0', '--knn-draws'),
    ('generate', GEN_OAL + ' --keep 60 --knn-draws 50', '--keep'),
    ('generate', GEN_OAL + ' --repeats 0', '--repeats'),
    ('generate', GEN_OAL + ' --samples-per-iteration 0', '--samples-per-iteration'),
    ('generate', GEN_OAL + ' --anchor mean', '--anchor'),
    ('generate', GEN_OAL + ' --knn-select best', '--knn-select'),
    ('generate', GEN_OAL + ' --inject all', '--inject'),
    ('generate', GEN_OAL + ' --teacher {bad}/a_file', 'is a file'),
    ('generate', GEN_OAL + ' --pipeline {bad}/unfinished_pipe', 'unfinished'),
    ('generate', GEN_OAL + ' --out {bad}/manifest_corrupt', 'manifest.json'),
    ('generate', GEN_OAL.replace('{out}', '{runs}/ce_s0'), 'is the --teacher run'),
    ('generate', FIT + ' --lr 1e30 --vae-steps 3', 'nothing was saved'),  # a NaN loss: not even a manifest is left
    ('generate', FIT + ' --lr nan', '--lr'),
    ('generate', FIT + ' --batch-size 0', '--batch-size'),
    ('generate', FIT + ' --check-per-class 0', '--check-per-class'),
    ('generate', FIT + ' --vae-channels 12', '--vae-channels'),
    ('generate', FIT + ' --unet-channels 4', '--unet-channels'),
    ('generate', FIT + ' --seed -1', '--seed'),
    ('generate', FIT + ' --dataset folder:{bad}/wnid_dataset', 'pretrained pipeline'),
    ('generate', FIT.replace('{out}', '{pipe}'), '--overwrite'),  # a finished pipeline is replaced only on request
    ('generate', FIT.replace('{out}', '{run:ce_s0}') + ' --overwrite', 'train_sio.py'),  # nor is a run of another script
    ('generate', FIT.replace('{out}', '{bad}/sio_manifest'), 'generate.py sio'),
    ('generate', FIT.replace('{out}', '{bad}/manifest_corrupt'), 'manifest.json'),
    ('generate', FIT.replace('{out}', '{bad}/a_file'), 'is a file'),
    ('generate', 'fractals --out {out} --seed -1', '--seed'),
    ('generate', 'fractals --out {out} --count 1000000000000', 'GiB'),
    ('generate', 'fractals --out {out} --size 1000000', 'GiB'),
    ('generate', 'fractals --out {bad}/a_file', 'is a file'),
    ('generate', 'fractals --out {user} --overwrite', 'did not write'),  # the user's notes.txt is never removed
    ('generate', 'fractals --out {bad}/manifest_corrupt', 'manifest.json'),
    ('generate', 'fractals --out {bad}/oal_manifest', 'generate.py oal'),
]
EVAL_MSP = '{runs}/ce_s0 --detectors msp --out {out}'
BAD_INPUTS_EVALUATE = [  # evaluate.py: more kinds of bad input
    ('evaluate', EVAL_MSP + ' --near id={bad}/no_images', 'reserved'),  # it would replace the ID test set
    ('evaluate', EVAL_MSP + ' --far near={bad}/no_images', 'reserved'),
    ('evaluate', EVAL_MSP + ' --near x={bad}/no_images --far x={bad}/syn_partial', 'twice'),
    ('evaluate', EVAL_MSP + ' --near tin', 'NAME=PATH'),
    ('evaluate', 'a={runs}/ce_s0 ={runs}/ce_s1 --out {out}', 'has no NAME'),
    ('evaluate', 'a={runs}/ce_s0 a={runs}/ce_s1 --out {out}', 'is given twice'),
    ('evaluate', 'a={runs}/ce_s0 b= --out {out}', 'names no run'),
    ('evaluate', '{runs}/ce_s0 {runs}/ce_s0 --out {out}', 'share the name'),
    ('evaluate', EVAL_MSP + ' --far noise={bad}/no_images', 'holds no images'),
    ('evaluate', EVAL_MSP + ' --far noise={bad}/a_file', 'is a file'),
    ('evaluate', EVAL_MSP + ' --near tin={bad}/none', 'does not exist'),
    ('evaluate', '{runs}/ce_s0 --detectors msp --far broken={bad}/syn_corrupt_png', '1.png'),  # read by the network pass
    ('evaluate', '{bad}/run_unfinished --out {out}', 'unfinished'),
    ('evaluate', '{bad}/nan.pt --out {out}', 'NaN'),
    ('evaluate', '{bad}/int_weights.pt --out {out}', 'integer weights'),
    ('train_oal', '--dataset digits --teacher {bad}/nan.pt --out {out}', 'NaN'),
    ('evaluate', '{bad}/truncated.pt --out {out}', 'cannot be read'),
    ('evaluate', '{bad}/tensor.pt --out {out}', 'not a synth-ood checkpoint'),
    ('evaluate', '{bad}/wrong_arch.pt --out {out}', 'holds no resnet18'),
    ('evaluate', '{bad}/zero_std.pt --out {out}', 'usable arch, dataset, classes, image_size, mean or std'),
    ('evaluate', '{bad}/inf_std.pt --out {out}', 'usable arch, dataset, classes, image_size, mean or std'),
    ('evaluate', '{bad}/three_names.pt --out {out}', 'usable arch, dataset, classes, image_size, mean or std'),
    ('evaluate', 'openood:{bad}/foreign.ckpt --out {out}', '--dataset'),
    ('evaluate', 'openood:{bad}/foreign.ckpt --dataset cifar10 --out {out}', 'fits none'),
    ('evaluate', 'openood:{bad}/no_images --dataset cifar10 --out {out}', 's<seed>/best.ckpt'),
    ('evaluate', 'openood:{bad}/truncated.pt --dataset cifar10 --out {out}', 'cannot be read'),
    ('evaluate', 'torchvision:vgg16 --out {out}', 'torchvision:resnet50'),
    ('evaluate', EVAL_MSP + ' --dataset imagenet', '--openood-root'),
    ('evaluate', EVAL_MSP + ' --dataset mnist', 'unknown --dataset'),
    ('evaluate', EVAL_MSP.replace('{runs}/ce_s0', '{bad}/folder8.pt') + ' --dataset imagenet200 --openood-root {bad}/no_images', 'benchmark_imglist'),
    ('evaluate', EVAL_MSP.replace('{runs}/ce_s0', '{bad}/folder8.pt') + ' --dataset imagenet --openood-root {bad}/openood_lists_only', 'imagenet_1k entry'),
    ('evaluate', EVAL_MSP + ' --aps openood', '--aps-ood PATH'),
    ('evaluate', EVAL_MSP + ' --aps val --aps-ood {bad}/a_file', 'is a file'),
    ('evaluate', EVAL_MSP + ' --plots {out}', 'distinct'),
    ('evaluate', EVAL_MSP + ' --cache {out}/cache', 'neither inside the other'),
    ('evaluate', '{bad}/run_ce --detectors msp --out {bad}/run_ce/results', 'lies in the run run_ce'),
    ('evaluate', EVAL_MSP.replace('{out}', '{bad}/syn_missing_class/000') + ' --far mine={bad}/syn_missing_class', 'lies in the --far mine folder'),
    ('evaluate', EVAL_MSP + ' --workers -1', '--workers'),
]
T = '{bad}/t'  # the trainers' further bad inputs (fixture bad_trainer_inputs)
BAD_INPUTS_TRAINERS = [  # train_sio.py and train_oal.py: more kinds of bad input
    ('train_sio', SIO + ' --epochs 1.5', '--epochs'),
    ('train_sio', SIO + ' --batch-size -4', '--batch-size'),
    ('train_sio', SIO + ' --lr 1e400', '--lr'),
    ('train_sio', SIO + ' --weight-decay nan', '--weight-decay'),
    ('train_sio', SIO + ' --synthetic {runs}/syn --alpha nan', '--alpha'),
    ('train_sio', SIO + ' --method logitnorm --tau inf', '--tau'),
    ('train_sio', SIO + ' --method pixmix --mixing-set {bad}/no_images --pixmix-k 1.5', '--pixmix-k'),
    ('train_sio', SIO + ' --method pixmix --mixing-set {bad}/no_images --aug-severity 0', '--aug-severity'),
    ('train_sio', SIO + ' --image-size x', '--image-size'),
    ('train_sio', SIO + ' --seed 2147483648', '--seed'),
    ('train_sio', SIO + ' --seed 1,,2', '--seed'),
    ('train_sio', SIO + ' --workers x', '--workers'),
    ('train_sio', SIO + ' --device cuda', '--device'),
    ('train_sio', SIO + ' --method mixup', '--method'),
    ('train_sio', SIO.replace('{out}', '{out}/{{x}}'), 'may hold only {seed}'),  # a template holds only the fields it is filled with
    ('train_sio', SIO.replace('{out}', '{out}/{{seed'), 'may hold only {seed}'),
    ('train_sio', SIO.replace('{out}', '{out}/{{seed!r}}'), 'may hold only {seed}'),
    ('train_sio', SIO.replace('{out}', T + '/user_log'), 'did not write'),  # the user's log.jsonl is no run of ours
    ('train_sio', SIO.replace('{out}', T + '/user_best') + ' --overwrite', 'did not write'),  # nor the user's best.pt
    ('train_sio', SIO.replace('{out}', T + '/user_manifest'), 'no synth-ood script wrote'),
    ('train_sio', SIO.replace('{out}', T + '/broken_manifest') + ' --overwrite', 'manifest.json is unreadable'),
    ('train_sio', SIO.replace('{out}', T + '/set_folder') + ' --overwrite', 'not a train_sio.py one'),  # another script's
    ('train_sio', SIO.replace('{out}', T + '/file_link'), 'is a file'),
    ('train_sio', SIO.replace('{out}', T + '/syn_set') + ' --synthetic ' + T + '/syn_set', 'is the --synthetic set'),
    ('train_sio', SIO.replace('{out}', T + '/syn_set/run') + ' --synthetic ' + T + '/syn_set', 'lies in the --synthetic set'),
    ('train_sio', SIO.replace('{out}', '{run:ce_s0}') + ' --overwrite --synthetic {bad}/none', 'does not exist'),  # untouched
    ('train_sio', SIO.replace('{out}', '{run:ce_s0}') + ' --overwrite --epochs 0', '--epochs'),
    ('train_sio', SIO + ' --synthetic {bad}/syn_truncated/images.npy', 'takes the folder that holds images.npy'),
    ('train_sio', SIO + ' --synthetic ' + T + '/syn_unfinished', 'unfinished'),  # no completion record in its manifest
    ('train_sio', SIO + ' --synthetic ' + T + '/syn_meta_list', 'not a JSON object'),
    ('train_sio', SIO + ' --synthetic ' + T + '/syn_meta_classes', 'generated for classes'),
    ('train_sio', SIO + ' --synthetic ' + T + '/syn_meta_counts', 'unfinished'),
    ('train_sio', SIO + ' --synthetic ' + T + '/syn_float_tiff', 'floating-point'),
    ('train_sio', SIO + ' --synthetic ' + T + '/syn_huge_png', 'too large to decode'),
    ('train_sio', SIO + ' --synthetic ' + T + '/syn_no_labels', 'labels.npy'),
    ('train_sio', SIO + ' --synthetic ' + T + '/syn_short_labels', 'one label per image'),
    ('train_sio', SIO + ' --synthetic ' + T + '/syn_2d_labels', 'one label per image'),
    ('train_sio', SIO + ' --synthetic ' + T + '/syn_float_images', 'uint8 (N, H, W, 3)'),
    ('train_sio', SIO + ' --synthetic ' + T + '/syn_named_classes', 'holds no synthetic set'),
    ('train_sio', SIO + ' --method oe --oe-data ' + T + '/oe_object.npy', 'numeric .npy'),
    ('train_sio', SIO + ' --alpha 0.5', 'pass --synthetic'),  # else a baseline run, the flag silently unused (1 is)
    ('train_sio', SIO + ' --oe-data ' + T + '/oe_float.npy', 'for --method oe only'),
    ('train_sio', SIO + ' --tau 0.1', 'for --method logitnorm only'),
    ('train_sio', SIO + ' --method oe --oe-data ' + T + '/oe_float.npy --oe-batch-size 1000000000000', 'a batch of'),
    ('train_sio', SIO + ' --synthetic ' + T + '/syn_superscript', 'holds no synthetic set'),
    ('train_sio', '--dataset folder:' + T + '/folder_one_class --epochs 1 --out {out}', '2 or more'),
    ('train_oal', OAL.replace('{bad}/out_ok', T + '/out_past_float32_8'), 'finite floats'),
    ('train_oal', OAL.replace('{bad}/out_ok', T + f'/out_past_float32_{np.dtype(np.longdouble).itemsize}'), 'finite floats'),
    ('generate', GEN_SIO + ' --class-names ' + T + '/names_blank.txt', 'empty name'),
    ('generate', GEN_SIO.replace('digits', 'folder:' + T + '/folder_ab'), 'pass a hub id (fit takes'),
    ('evaluate', '{runs}/ce_s0 --dataset cifar10 --detectors msp --out {out}', 'was trained on digits'),
    ('evaluate', '{bad}/folder8.pt {bad}/folder16.pt --detectors msp --out {out}', 'image sizes'),
    ('evaluate', '_meta={runs}/ce_s0 --detectors msp --out {out}', 'reserved'),
    ('evaluate', EVAL_MSP + ' --plots {bad}/a_file/plots', 'cannot be written'),  # found before any pass
    ('evaluate', EVAL_MSP.replace('{out}', '{bad}/link_to_nothing'), 'cannot be written'),
    ('evaluate', '{runs}/ce_s0 {bad}/link_to_ce_s0 --detectors msp --out {out}', 'one checkpoint'),  # not 2 seeds
    ('evaluate', '{runs}/ce_s0 {runs}/ce_s0/best.pt --detectors msp --out {out}', 'one checkpoint'),
    ('generate', GEN_SIO.replace('--steps 1 ', '--steps 1000 '), 'schedules'),  # its DDIM's 1000 steps, offset 1
    ('generate', GEN_SIO + ' --prompt qqqqqqqqqqqqqqqqqqqq_{{}}', 'tokens'),  # 16 tokens: the class name cut off
    ('train_sio', SIO + ' --overw', 'unrecognized'),
    ('train_sio', SIO + ' --arch resnet18_224', 'at least 32'),  # digits' 8x8 by default
    ('train_oal', OAL.replace('{runs}/ce_s0 --outliers', '{bad}/init_s{{seed}}.pt --outliers').replace('{out}', '{out}/s{{seed}}')
     + ' --seed 0,1', 'different image sizes'),  # abbreviations: an interrupt's command would keep them
    ('train_sio', '--dataset digits --epochs 2 --seed 0,1 --overwrite --out {bad}/seeds/s{{seed}}', 'cannot be written'),
    ('generate', 'fractals --count 2 --size 16 --out {runs}/ce_s0/fractals', 'an output folder of its own'),
    ('evaluate', '{runs}/ce_s0/../ce_s0/x=1 --detectors msp --out {out}', "holds '/'"),
    ('evaluate', '{runs}/ce_s0 --detectors ash --ash-percentile 99.9 --out {out}', 'keeps none'),
    ('train_sio', SIO + ' --method oe --oe-data ' + T + '/oe_float.npy', 'uint8 (N, H, W, 3)'),
    ('train_sio', SIO + ' --method oe --oe-data ' + T + '/oe_empty.npy', 'uint8 (N, H, W, 3)'),
    ('train_sio', SIO + ' --method pixmix --mixing-set ' + T + '/mix_corrupt', 'cannot read image'),
    ('train_sio', SIO + ' --method pixmix --mixing-set ' + T + '/oe_float.npy', 'no images found'),
    ('train_sio', SIO.replace('digits', 'folder:' + T + '/folder_test_extra'), 'which train/ lacks'),
    ('train_sio', SIO.replace('digits', 'folder:' + T + '/folder_no_val'), 'val'),
    ('train_sio', SIO.replace('digits', 'folder:' + T + '/folder_val_lacks_b'), 'no image of class b'),
    ('train_sio', SIO.replace('{out}', T + '/eval_folder') + ' --resume', 'not a train_sio.py one'),
    ('train_oal', OAL + ' --w-knn inf', '--w-knn'),
    ('train_oal', OAL + ' --w-diff -0.1', '--w-diff'),
    ('train_oal', OAL + ' --lr-dt 0', '--lr-dt'),
    ('train_oal', OAL + ' --lr-q nan', '--lr-q'),
    ('train_oal', OAL + ' --weight-decay -1', '--weight-decay'),
    ('train_oal', OAL + ' --epochs x', '--epochs'),
    ('train_oal', OAL + ' --teacher-norm other', '--teacher-norm'),
    ('train_oal', OAL + ' --club other', '--club'),
    ('train_oal', OAL + ' --teacher-min-acc nan', '--teacher-min-acc'),
    ('train_oal', OAL + ' --dataset folder:{bad}/wnid_dataset', 'folder datasets'),
    ('train_oal', OAL + ' --init {runs}/{{x}}', 'may hold only {seed}'),
    ('train_oal', OAL.replace('{out}', '{out}/{{seed}}{{x}}'), 'may hold only {seed}'),
    ('train_oal', OAL.replace('{out}', '{runs}/ce_s0'), 'is the --teacher run'),
    ('train_oal', OAL.replace('{out}', '{runs}/ce_s0/oal'), 'lies in the --teacher run'),
    ('train_oal', OAL.replace('{out}', '{bad}/out_ok'), 'is the --outliers set'),
    ('train_oal', OAL.replace('{out}', T + '/user_log'), 'did not write'),
    ('train_oal', OAL.replace('{out}', T + '/set_folder') + ' --overwrite', 'not a train_oal.py one'),
    ('train_oal', OAL + ' --teacher ' + T + '/timm_no_weights', 'no model.safetensors or pytorch_model.bin'),
    ('train_oal', OAL + ' --teacher ' + T + '/not_a_vit.ckpt', 'not a timm ViT that loads strictly'),
    ('train_oal', OAL + ' --teacher ' + T + '/bare_vit.ckpt --teacher-norm own', '--teacher-norm published'),
    ('train_oal', OAL + ' --teacher ' + T + '/timm_ten', 'has 10 classes but the dataset has 6'),
    ('train_oal', OAL + ' --teacher ' + T + '/config_list', 'not a JSON object'),
    ('train_oal', OAL + ' --teacher ' + T + '/config_broken', 'unreadable'),
    ('train_oal', OAL + ' --init {bad}/tensor.pt', 'not a synth-ood checkpoint'),
    ('train_oal', OAL + ' --init {bad}/teacher_last_only', 'not found'),
    ('train_oal', OAL + ' --arch resnet18', 'not --arch resnet18'),
    ('train_oal', OAL + ' --outliers ' + T + '/out_unfinished', 'unfinished'),
    ('train_oal', OAL + ' --outliers {bad}/out_ok/knn_outliers.npy', 'takes the folder'),
    ('train_oal', OAL + ' --outliers ' + T + '/out_meta_broken', 'unreadable'),
    ('train_oal', OAL + ' --outliers ' + T + '/out_int', 'finite floats'),
    ('train_oal', OAL + ' --outliers ' + T + '/out_2d', 'expected (6, M >= 1, d)'),
    ('train_oal', OAL + ' --outliers ' + T + '/out_inf', 'finite'),
    ('train_oal', OAL + ' --outliers ' + T + '/out_diff_3d', 'pooled latents'),
    ('train_oal', OAL.replace('{out}', T + '/eval_folder') + ' --resume', 'not a train_oal.py one'),
    ('train_oal', OAL.replace('{runs}/ce_s0 --init', '{bad}/run_unfinished --init'), 'unfinished'),  # its trainer runs
    ('train_oal', OAL.replace('--init {runs}/ce_s0', '--init {bad}/run_unfinished'), 'unfinished'),
    ('generate', GEN_OAL.replace('{runs}/ce_s0', '{bad}/run_unfinished'), 'unfinished'),
    ('train_oal', OAL.replace('--teacher {runs}/ce_s0', '--teacher {bad}/no_fc_bias.pt'), 'holds no cnn'),
    ('train_oal', OAL.replace('--init {runs}/ce_s0', '--init {bad}/wrong_arch.pt'), 'holds no resnet18'),
    ('train_oal', OAL.replace('--teacher {runs}/ce_s0', '--teacher {bad}/bool_size.pt'), 'image_size'),
    ('train_oal', OAL.replace('--init {runs}/ce_s0', '--init {bad}/huge_size.pt'), 'image_size'),
    ('generate', GEN_OAL.replace('{runs}/ce_s0', '{bad}/no_fc_bias.pt'), 'holds no cnn'),
] + [('train_sio', SIO.replace('{out}', '{bad}/manifest_' + name) + ' --overwrite', 'manifest.json')
     for name in ('files_text', 'files_numbers', 'stale_null', 'settings_list', 'done_odd', 'no_script')]
BAD_INPUTS += BAD_INPUTS_GENERATE + BAD_INPUTS_EVALUATE + BAD_INPUTS_TRAINERS


def snapshot(path):
    """Every file under path (or path itself) -> its bytes, to show nothing there changed (the lock file aside)."""
    path = Path(path)
    if path.is_file():
        return {path: path.read_bytes()}
    return {f: f.read_bytes() for f in sorted(path.rglob('*')) if f.is_file() and not f.name.startswith('.lock')} if path.exists() else {}


@pytest.fixture(scope='session')
def bad_trainer_inputs(bad, runs):
    """More broken inputs for the trainers, in bad/t (so the snapshot of bad covers them)."""
    from PIL import Image
    root = bad / 't'
    images, labels = digits_train_set()
    for name, files in (('user_log', {'log.jsonl': '{"epoch": 1}\n'}), ('user_best', {'best.pt': 'mine'}),
                        ('user_manifest', {'manifest.json': '{"title": "my notes"}'}), ('broken_manifest', {'manifest.json': '{'}),
                        ('set_folder', {'manifest.json': json.dumps(dict(script='generate.py sio', settings={}, files=[],
                                                                         stale=[], done=[], complete=True))}),
                        ('eval_folder', {'manifest.json': json.dumps(dict(script='evaluate.py', settings={}, files=[],
                                                                          stale=[], done=[], complete=True))})):
        (root / name).mkdir(parents=True)
        for file, text in files.items():
            (root / name / file).write_text(text)
    (root / 'a_file').write_text('x')
    (root / 'file_link').symlink_to(root / 'a_file')
    meta = dict(dataset='digits', classes=train_sio.DIGIT_NAMES[:6], counts=[2] * 6, complete=True)

    def synthetic(name, meta=None, manifest=None, files=2):
        for c in range(6):
            (root / name / f'{c:03d}').mkdir(parents=True)
            for n, i in enumerate(np.flatnonzero(labels == c)[:files]):
                Image.fromarray(images[i]).save(root / name / f'{c:03d}' / f'{n}.png')
        for file, content in (('meta.json', meta), ('manifest.json', manifest)):
            if content is not None:
                (root / name / file).write_text(content if isinstance(content, str) else json.dumps(content))
        return root / name
    synthetic('syn_set', meta)
    synthetic('syn_unfinished', meta, dict(script='generate.py sio', settings={}, files=['000/'], stale=[], done=[],
                                           complete=False))
    synthetic('syn_meta_list', '[1, 2]')
    synthetic('syn_meta_classes', dict(meta, classes=6))
    synthetic('syn_meta_counts', dict(meta, counts='many', complete=False))
    Image.fromarray(np.zeros((8, 8), np.float32), mode='F').save(synthetic('syn_float_tiff') / '003' / '9.tiff')
    import struct
    import zlib
    chunk = lambda kind, data: struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    (synthetic('syn_huge_png') / '004' / '9.png').write_bytes(  # a header of 2e8 pixels, over twice PIL's limit
        b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 20000, 10000, 8, 0, 0, 0, 0)) + chunk(b'IEND', b''))
    (root / 'syn_no_labels').mkdir()
    np.save(root / 'syn_no_labels' / 'images.npy', images)
    for name, image_array, label_array in (('syn_short_labels', images, labels[:10]), ('syn_2d_labels', images, labels[:, None]),
                                           ('syn_float_images', images.astype(np.float32), labels)):
        (root / name).mkdir()
        np.save(root / name / 'images.npy', image_array)
        np.save(root / name / 'labels.npy', label_array)
    (root / 'syn_named_classes' / 'cats').mkdir(parents=True)
    np.save(root / 'oe_object.npy', np.array([[1], 'x'], dtype=object), allow_pickle=True)
    np.save(root / 'oe_float.npy', np.zeros((4, 8, 8, 3), np.float32))
    np.save(root / 'oe_empty.npy', np.zeros((0, 8, 8, 3), np.uint8))
    (root / 'mix_corrupt').mkdir()
    (root / 'mix_corrupt' / 'a.png').write_bytes(b'\x89PNG\r\n\x1a\n cut short')
    for split, names in (('train', ['a', 'b']), ('val', ['a', 'b']), ('test', ['a', 'b', 'c'])):
        for name in names:
            (root / 'folder_test_extra' / split / name).mkdir(parents=True)
            Image.fromarray(images[0]).save(root / 'folder_test_extra' / split / name / '0.png')
    (root / 'folder_no_val' / 'train' / 'a').mkdir(parents=True)
    Image.fromarray(images[0]).save(root / 'folder_no_val' / 'train' / 'a' / '0.png')
    for split, names in (('train', ['a', 'b']), ('val', ['a'])):  # val/b is there but empty
        (root / 'folder_val_lacks_b' / split / 'b').mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / 'folder_val_lacks_b' / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[0]).save(root / 'folder_val_lacks_b' / split / name / '0.png')
    vit = tiny_timm_vit()
    save_timm(vit, root / 'timm_no_weights')
    (root / 'timm_no_weights' / 'pytorch_model.bin').unlink()
    save_timm(tiny_timm_vit(num_classes=10), root / 'timm_ten')
    torch.save(vit.state_dict(), root / 'bare_vit.ckpt')
    torch.save(torch.load(runs / 'ce_s0' / 'best.pt', weights_only=False)['model'], root / 'not_a_vit.ckpt')
    for name, text in (('config_list', '[1]'), ('config_broken', '{"architecture": ')):
        (root / name).mkdir()
        (root / name / 'config.json').write_text(text)

    def outliers(name, knn, diff, files=None):
        (root / name).mkdir()
        np.save(root / name / 'knn_outliers.npy', knn)
        np.save(root / name / 'diffusion_outliers.npy', diff)
        for file, text in (files or {}).items():
            (root / name / file).write_text(text)
    knn, diff = np.ones((6, 4, 128), np.float32), np.ones((4, 8), np.float32)
    outliers('out_unfinished', knn, diff, {'manifest.json': json.dumps(dict(
        script='generate.py oal', settings={}, files=[], stale=[], done=[], complete=False))})
    outliers('out_meta_broken', knn, diff, {'meta.json': '{"complete": tr'})
    outliers('out_int', knn.astype(np.int64), diff)
    outliers('out_2d', knn[0], diff)
    outliers('out_inf', np.full_like(knn, np.inf), diff)
    outliers('out_diff_3d', knn, diff[None])
    for dtype in {np.dtype(np.float64), np.dtype(np.longdouble)}:  # values that become inf as float32
        outliers(f'out_past_float32_{dtype.itemsize}', np.full(knn.shape, 1e39, dtype), diff)
    for name, classes in (('folder_one_class', 'a'), ('folder_ab', 'ab')):
        for split, c in ((split, c) for split in ('train', 'val') for c in classes):
            (root / name / split / c).mkdir(parents=True)
            Image.fromarray(images[0]).save(root / name / split / c / '0.png')
    synthetic('syn_superscript', meta).joinpath('003').rename(root / 'syn_superscript' / '\u00b3')  # isdigit(), no int
    (root / 'names_blank.txt').write_text('zero\n_\ntwo\nthree\nfour\nfive\n')
    return root


@pytest.mark.parametrize('script,argv,word', BAD_INPUTS, ids=[f'{i:03d}-{s}' for i, (s, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_refused_in_one_line(script, argv, word, runs, bad, bad_trainer_inputs, tiny_pipeline, tmp_path,
                                          capsys):
    import shutil
    out, user = tmp_path / 'out', tmp_path / 'user'  # an empty folder, and one holding the user's own file
    out.mkdir()
    user.mkdir()
    (user / 'notes.txt').write_text('the user was here')
    for spec in set(a for a in argv.split() if a.startswith('{run:')):
        name, _, replacement = spec[5:-1].partition(':')
        shutil.copytree(runs / name, tmp_path / 'copy')
        if replacement:
            shutil.copy(bad / replacement, tmp_path / 'copy' / 'last.pt')
        argv = argv.replace(spec, str(tmp_path / 'copy'))
    argv = argv.format(out=out, user=user, runs=runs, bad=bad, pipe=tiny_pipeline).split()
    target = Path(argv[argv.index('--out') + 1]) if '--out' in argv else out
    before = snapshot(target), snapshot(bad)
    main = {'train_sio': train_sio.main, 'train_oal': train_oal.main, 'generate': generate.main, 'evaluate': evaluate.main}[script]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)  # any other exception (a traceback) fails the test
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if 'error:' in l]
    assert stop.value.code == 2 and len(lines) == 1 and word in lines[0], err
    assert (snapshot(target), snapshot(bad)) == before


SCRIPTS = ('train_sio.py', 'train_oal.py', 'evaluate.py', 'generate.py')
PER_SCRIPT = {'main', 'get_args', 'prepare', 'start', 'train', 'train_epoch', 'end_epoch', 'RECIPES', 'RUN_FLAGS', 'MIN_LR'}


def top_level_definitions(path):
    """{name: source text} of a script's top-level functions, classes and assignments (with their comments)."""
    import ast
    text = (REPO / path).read_text()
    lines, definitions = text.splitlines(), {}
    for node in ast.parse(text).body:
        names = [node.name] if hasattr(node, 'name') else [t.id for t in getattr(node, 'targets', []) if hasattr(t, 'id')]
        start = min([node.lineno] + [d.lineno for d in getattr(node, 'decorator_list', [])])
        for name in names:
            definitions[name] = '\n'.join(lines[start - 1:node.end_lineno])
    return definitions


def test_shared_blocks_are_worded_the_same_in_every_script():
    """The scripts share no code by design; what they repeat must stay word for word the same, so readers see it is the
    same and skip it: the data, model and plumbing blocks are in all four, and every function, class or constant
    defined in more than one script (augment, the teachers, ...) is identical wherever it appears."""
    definitions = {path: top_level_definitions(path) for path in SCRIPTS}
    blocks = {path: (REPO / path).read_text() for path in SCRIPTS}
    for title in ('# Data, the same in every script', '# Model, the same in every script',
                  '# Plumbing, identical in every script'):
        assert all(title in text for text in blocks.values()), title
    shared = {'fail', 'claim', 'record', 'finish', 'write_atomic', 'user_errors', 'setup_distributed', 'on_rank0', 'Parser',
              'number', 'read_json', 'load_dataset', 'read_image', 'Net', 'normalize', 'read_checkpoint', 'CIFAR_STATS'}
    assert all(shared <= set(d) for d in definitions.values()), {p: shared - set(d) for p, d in definitions.items()}
    names = {name for d in definitions.values() for name in d} - PER_SCRIPT
    for name in sorted(names):
        texts = {d[name] for d in definitions.values() if name in d}
        assert len(texts) == 1, f'{name} is worded differently in ' + ', '.join(p for p, d in definitions.items() if name in d)
