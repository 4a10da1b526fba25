"""Generate the data both papers train on, with any diffusers text-to-image pipeline.

Papers: SIO, "Synthetic In-Distribution Data Benefits Out-of-Distribution Detection" (arXiv 2303.14531),
and OAL, "Enhancing OOD Detection Using Latent Diffusion" (arXiv 2406.16525).
Idea: SIO prompts a generator with "a photo of a {class}" for more labelled ID images. OAL finds
low-density points of each class in a teacher's feature space (k-NN) and turns them into outliers by
writing them into the class-name token of the prompt, keeping the pooled final latents.

  fit       a small Stable-Diffusion-layout pipeline trained on the ID set, when no pretrained one is at hand
  sio       class folders 000/, 001/ ... of synthetic ID images + images.npy/labels.npy (SIO's format)
  oal       knn_outliers.npy (C, M, d) and diffusion_outliers.npy (N, latent width) for train_oal.py
  fractals  random IFS fractal PNGs: an offline stand-in for PixMix's mixing set

    python generate.py fit --dataset digits --out pipelines/digits                      # ~2 min on a 2-core CPU
    python generate.py sio --pipeline pipelines/digits --dataset digits --per-class 300 --out samples/digits_sio
    python generate.py oal --pipeline pipelines/digits --teacher runs/digits_ce_s0 --dataset digits --out outliers/d
    python generate.py fractals --out mixing/fractals --count 1000
    # the papers' setting on a GPU (Stable Diffusion v1.4, PLMS 50 steps, guidance 7.5, seed 42)
    python generate.py sio --pipeline CompVis/stable-diffusion-v1-4 --dataset cifar10 --per-class 5000 --out samples/c10
    python generate.py oal --pipeline CompVis/stable-diffusion-v1-4 --dataset cifar10 --out outliers/c10  # TEACHERS
    torchrun --nproc_per_node=8 generate.py sio ...     # batches split across ranks, each image written once

Every image depends only on (seed, index) and batches are fixed index ranges recorded as done in the
folder's manifest, so an interrupted run started again makes only the unfinished batches and ends with
exactly the files of an uninterrupted run.
"""
import argparse
import fcntl, hashlib, json, math, os, re, shlex, shutil, signal, string, sys, threading, time
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

SD_HUB_ID = 'CompVis/stable-diffusion-v1-4'  # the OAL paper's generator
OAL_PROMPT = 'A high-quality image of the {}'  # OAL / Dream-OOD prompt
FIT_TEMPLATES = ['a photo of a {}', OAL_PROMPT, '{}']  # fit trains on all, so sio and oal prompts both work
TEACHERS = {  # OAL's teacher: a timm ViT-B/16 (ImageNet-21k) fine-tuned on the ID set at 224, from the hub
    'cifar10': 'edadaltocg/vit_base_patch16_224_in21k_ft_cifar10',  # the authors' file; model card: 98.96%
    'cifar100': 'edadaltocg/vit_base_patch16_224_in21k_ft_cifar100'}  # theirs is unpublished: the closest; 93.16%
RECIPE_AUGMENT = {'digits': (1, False), 'cifar10': (4, True), 'cifar100': (4, True), 'folder': (0, True)}  # pad, flip
FIT_FLAGS = ('dataset', 'classes', 'seed', 'device', 'steps', 'vae_steps', 'batch_size', 'lr', 'unet_channels',
             'vae_channels', 'text_dim', 'prompt_dropout', 'check_per_class')  # what a fitted pipeline depends on
MAPPING_FILES = ('LOC_synset_mapping.txt', 'synset_words.txt')  # ImageNet's 'wnid name, other name' lists
PNG_BYTES = 4096  # a small PNG's share of the disk (one file system block), for the up-front disk check


# ------------------------------------------------------------------------------------------------
# The method: OAL's k-NN low-density sampler (NPOS / Dream-OOD), its class anchors and token
# injection, the latent pooling; SIO's index rule; the IFS fractals of PixMix's mixing set.

def kth_distance(queries, bank, k, chunk=8192):
    """Squared L2 distance from each query to its k-th nearest point of bank (a point is its own neighbour);
    kthvalue is 2-3x faster when k is a large share of the bank (digits: 105 of 106), topk when small."""
    kth = ((lambda d: d.kthvalue(k, dim=1).values) if 4 * k > len(bank) else
           (lambda d: d.topk(k, dim=1, largest=False).values[:, -1]))
    return torch.cat([kth(torch.cdist(queries[i:i + chunk], bank).pow(2)) for i in range(0, len(queries), chunk)])

def knn_outliers(class_feats, k=300, select=50, sigma=0.07, draws=1500, keep=2, repeats=10, mode='faithful',
                 generator=None):
    """(select * keep * repeats, d) unit-norm outlier embeddings around one class's low-density boundary."""
    X = F.normalize(class_feats.float(), dim=1)
    k = min(k, len(X) - 1)  # clipped to n - 1 for small classes (the papers are silent)
    boundary = X[kth_distance(X, X, k).topk(select).indices]  # the most isolated points, most isolated first
    out = []
    for _ in range(repeats):
        # As in Dream-OOD/OAL: one set of `draws` Gaussian vectors per repeat, shared by every boundary point
        eps = torch.randn(draws, X.shape[1], generator=generator).to(X.device)
        candidates = F.normalize(boundary.repeat_interleave(draws, dim=0) + sigma * eps.repeat(select, 1), dim=1)
        score = kth_distance(candidates, X, k)  # candidate b*draws + j: boundary point b's draw j
        if mode == 'faithful':
            # Published behaviour: the boundary-major scores are viewed as (draws, select) and the top-`keep`
            # rows r of each column b give candidate b*draws + r[:, b], not the top scorers of point b
            rows = score.view(draws, select).topk(keep, dim=0).indices  # (keep, select)
            picked = ((torch.arange(select, device=X.device) * draws)[None, :] + rows).T.reshape(-1)
        else:  # fixed: the `keep` highest-scoring candidates of each boundary point
            rows = score.view(select, draws).topk(keep, dim=1).indices  # (select, keep)
            picked = ((torch.arange(select, device=X.device) * draws)[:, None] + rows).reshape(-1)
        out.append(candidates[picked])
    return torch.cat(out)

@torch.no_grad()
def class_anchor_norms(pipe, names, kind):
    """Norm of each class's anchor in the generator's text encoder, which the unit k-NN outliers are scaled to:
    'token' = mean input embedding of the name's tokens (OAL on CIFAR-100, about 0.39), 'pooled' = mean-pooled
    encoder output of the name (OAL on CIFAR-10, about 27 for SD v1.4)."""
    tok, table = pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight
    if kind == 'token':
        return [table[tok(name, add_special_tokens=False).input_ids].float().mean(0).norm().item() for name in names]
    ids = [tok(name, padding='max_length', max_length=tok.model_max_length, truncation=True, return_tensors='pt')
           .input_ids.to(table.device) for name in names]
    return [pipe.text_encoder(name_ids)[0].float().mean(1).norm().item() for name_ids in ids]

# OAL's outlier_generate.py prompts CIFAR-100 with these names (CIFAR-100's class order) ...
OAL_CIFAR100_NAMES = (
    'apples,aquarium fish,baby,bear,beaver,bed,bee,beetle,bicycle,bottles,bowls,boy,bridge,bus,butterfly,camel,'
    'cans,castle,caterpillar,cattle,chair,chimpanzee,clock,cloud,cockroach,couch,crab,crocodile,cups,dinosaur,'
    'dolphin,elephant,flatfish,forest,fox,girl,hamster,house,kangaroo,computer keyboard,lamp,lawn-mower,leopard,'
    'lion,lizard,lobster,man,maple,motorcycle,mountain,mouse,mushrooms,oak,oranges,orchids,otter,palm,pears,'
    'pickup truck,pine,plain,plates,poppies,porcupine,possum,rabbit,raccoon,ray,road,rocket,roses,sea,seal,shark,'
    'shrew,skunk,skyscraper,snail,snake,spider,squirrel,streetcar,sunflowers,sweet peppers,table,tank,telephone,'
    'television,tiger,tractor,train,trout,tulips,turtle,wardrobe,whale,willow,wolf,woman,worm').split(',')
# ... and its text encoder overwrites the first token of the class index's label in this list, for every dataset
# (ldm/modules/encoders/modules.py): for CIFAR-10 these are other words than the prompt's, so nothing is replaced
OAL_INJECT_LABELS = [{1: 'fish', 21: 'chimp', 39: 'keyboard', 41: 'mower', 58: 'truck', 83: 'peppers'}.get(i, name)
                     for i, name in enumerate(OAL_CIFAR100_NAMES)]

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
    token of OAL_INJECT_LABELS[c], whatever the dataset, so in a CIFAR-10 prompt nothing changes and their
    CIFAR-10 outliers are plain class-prompt samples. fixed: every token of the class name in the prompt."""
    if mode == 'published':
        return tokenizer(OAL_INJECT_LABELS[c], add_special_tokens=False).input_ids[:1]
    return tokenizer(names[c], add_special_tokens=False).input_ids

def projection(d_from, d_to, seed):
    """A fixed, seeded random map (d_from, d_to) from teacher features to the token-embedding size when the two
    differ, with orthonormal rows or columns: it keeps norms when d_from <= d_to."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(d_from, d_to), min(d_from, d_to), generator=g))
    return q if d_from >= d_to else q.T

def oal_draw(i, seed, num_classes, pool):
    """Iteration i's class and outlier row (among the first 1,000 of the class, as OAL), from (seed, i) alone."""
    rng = np.random.RandomState(seed * 1000 + i)
    return rng.randint(num_classes), rng.randint(min(1000, pool))

def pooled_latents(latents):
    """OAL's diffusion outlier: the final denoised latent (before the VAE decodes it) averaged over its channels,
    then over rows: one vector of latent width per sample (64-d at 512x512)."""
    return latents.float().mean(dim=1).mean(dim=1)

def sio_image(i, per_class, seed):
    """SIO set image i: class i // per_class, number i % per_class, drawn from generator seed (seed, i) alone."""
    return i // per_class, i % per_class, seed * 1_000_003 + i

def ifs_fractal(rng, size, points=50000):
    """One random iterated function system (2-4 contractive affine maps, chosen by |det|), run as 1,000 chaos-game
    chains; each map has its own colour, brightness follows log hit counts, on black (as PixMix's fractals)."""
    maps = rng.randint(2, 5)
    linear = rng.uniform(-1, 1, (maps, 2, 2))  # scaled below to a largest singular value < 1
    linear *= rng.uniform(0.5, 0.95, (maps, 1, 1)) / np.linalg.norm(linear, 2, axis=(1, 2))[:, None, None]
    shift = rng.uniform(-1, 1, (maps, 2))
    weights = np.abs(np.linalg.det(linear)) + 1e-3
    colours = rng.uniform(0.2, 1, (maps, 3))
    xy, hits = rng.uniform(-1, 1, (1000, 2)), []
    for step in range(20 + points // 1000):
        k = rng.choice(maps, size=len(xy), p=weights / weights.sum())
        xy = np.einsum('nij,nj->ni', linear[k], xy) + shift[k]
        if step >= 20:  # past the transient, the chains lie on the attractor
            hits.append((xy, k))
    xy, which = map(np.concatenate, zip(*hits))
    low, high = xy.min(0), xy.max(0)
    pixel = ((xy - low) / np.maximum(high - low, 1e-9) * (size - 1)).round().astype(int)
    image, counts = np.zeros((size, size, 3)), np.zeros((size, size))
    np.add.at(image, (pixel[:, 1], pixel[:, 0]), colours[which])
    np.add.at(counts, (pixel[:, 1], pixel[:, 0]), 1)
    brightness = np.log1p(counts) / np.log1p(counts.max())
    return (image / np.maximum(counts, 1)[..., None] * brightness[..., None] * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# fit, in named steps: a Stable-Diffusion-layout pipeline small enough to train on a CPU in minutes: the native
# resolution (8x8 for digits), a one-level VAE (latent = image size), two UNet levels of 16/16 channels (digits;
# 16/32 for larger images) without attention, the text added to the time embedding (addition_embed_type="text")
# plus cross-attention only in the middle block (4x4 for digits).

def build_tokenizer(words, folder, max_length):
    """A CLIP tokenizer whose vocabulary is every byte plus whole-word tokens for `words`."""
    from transformers import CLIPTokenizer
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    alphabet = [chr(c) for c in printable + list(range(256, 512 - len(printable)))]  # GPT-2's byte-level alphabet
    vocab, merges = {c: i for i, c in enumerate(alphabet + [c + '</w>' for c in alphabet])}, {}  # merges: ordered set
    for word in words:  # merges that build each word left to right, so it becomes one token
        merged, *pieces = list(word[:-1]) + [word[-1] + '</w>']
        for piece in pieces:
            merges.setdefault(f'{merged} {piece}')
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab.update({'<|startoftext|>': len(vocab), '<|endoftext|>': len(vocab) + 1})  # CLIP pools at the highest id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'vocab.json').write_text(json.dumps(vocab))
    (folder / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)

def build_parts(args, classes, size, folder, device):
    """Step 1: tokenizer, 2-layer CLIP text encoder, one-level VAE and small UNet (seeded: built in this order)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    words = sorted({w for t in FIT_TEMPLATES for w in t.replace('-', ' ').replace('{}', ' ').lower().split()} |
                   {w for c in classes for w in prompt_name(c).lower().split()})
    tokenizer = build_tokenizer(words, folder / 'tokenizer_build', max_length=16)
    n, channels = len(tokenizer), tuple(int(c) for c in args.unet_channels.split(','))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=n, hidden_size=args.text_dim, intermediate_size=2 * args.text_dim, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',), up_block_types=('UpDecoderBlock2D',),
        block_out_channels=(args.vae_channels,), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=size, mid_block_add_attention=False)
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        down_block_types=('DownBlock2D',) * len(channels), up_block_types=('UpBlock2D',) * len(channels),
        mid_block_type='UNetMidBlock2DCrossAttn', cross_attention_dim=args.text_dim, attention_head_dim=8,
        norm_num_groups=8, addition_embed_type='text', addition_embed_type_num_heads=2)
    return tokenizer, text_encoder.to(device), vae.to(device), unet.to(device)

def check_loss(loss, what, step, args):  # a NaN/inf loss stops fit in one line; nothing is saved
    if not torch.isfinite(loss).all():
        fail(f'fit: the {what} is {loss.float().mean().item()} at step {step}; nothing was saved (--lr {args.lr:g}: '
             f'lower it)')

def train_vae(args, vae, images, device, t_start):
    """Step 2: the VAE (reconstruction + SD's tiny KL weight) -> training latents at unit variance (SD's 0.18215)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    for step in tqdm(range(args.vae_steps), desc='fit vae', leave=False):
        x = images[torch.randint(len(images), (min(128, args.batch_size),), device=device)]
        posterior = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, x) + 1e-6 * posterior.kl().mean()
        check_loss(loss, 'VAE loss', step + 1, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 512]).latent_dist.mean for i in range(0, len(images), 512)])
    check_loss(latents, 'VAE latent', args.vae_steps, args)
    vae.register_to_config(scaling_factor=1 / latents.std().item())
    print(f'vae: reconstruction mse {loss.item():.4f}, latent scaling {vae.config.scaling_factor:.3f} '
          f'({time.time() - t_start:.0f}s)')
    return latents * vae.config.scaling_factor

def train_unet(args, tokenizer, text_encoder, unet, latents, labels, classes, device, t_start):
    """Step 3: UNet + text encoder, epsilon prediction on SD's schedule; all templates, '' at --prompt-dropout (CFG)."""
    from diffusers import DDPMScheduler
    noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_schedule='scaled_linear', beta_start=0.00085,
                                   beta_end=0.012)
    prompts = [t.format(prompt_name(c)) for c in classes for t in FIT_TEMPLATES]  # in (class, template) order
    prompt_ids = tokenizer(prompts, padding='max_length', max_length=16, truncation=True,
                           return_tensors='pt').input_ids.view(len(classes), len(FIT_TEMPLATES), -1).to(device)
    # called last and without truncation: the saved tokenizer.json keeps the last call's truncation setting
    empty_ids = tokenizer('', padding='max_length', max_length=16, return_tensors='pt').input_ids[0].to(device)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(text_encoder.parameters()), lr=args.lr)
    warmup, steps, n = min(100, args.steps // 10 + 1), args.steps, args.batch_size
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    bar = tqdm(range(steps), desc='fit unet', leave=False)
    for step in bar:
        idx = torch.randint(len(latents), (n,), device=device)
        ids = prompt_ids[labels[idx], torch.randint(len(FIT_TEMPLATES), (n,), device=device)]
        ids = torch.where((torch.rand(n, 1, device=device) < args.prompt_dropout), empty_ids, ids)
        noise = torch.randn_like(latents[idx])
        t = torch.randint(0, 1000, (n,), device=device)
        pred = unet(noise_schedule.add_noise(latents[idx], noise, t), t, text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, noise)
        check_loss(loss, 'UNet loss', step + 1, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f'{loss.item():.4f}')
    print(f'unet: {steps} steps, last loss {loss.item():.4f} ({time.time() - t_start:.0f}s)')

@torch.no_grad()
def check_agreement(args, pipe, ds, device):
    """Step 5: the share of 25-step, guidance-4 samples that a real-pixel classifier puts in their prompt's class."""
    from sklearn.linear_model import LogisticRegression
    pipe.set_progress_bar_config(disable=True)
    grey = lambda x: x.reshape(len(x), -1, 3).mean(-1) / 255
    clf = LogisticRegression(max_iter=3000).fit(grey(ds['train'][0]), ds['train'][1])
    agree = []
    for c, name in enumerate(ds['classes']):
        images = pipe([f'a photo of a {prompt_name(name)}'] * args.check_per_class, num_inference_steps=25,
                      guidance_scale=4.0, output_type='np',
                      generator=torch.Generator(device).manual_seed(args.seed + c)).images
        agree.append(clf.predict(grey(resize_uint8(images, ds['image_size']))) == c)
    return float(np.concatenate(agree).mean())

def train_pipeline(args, ds, folder, device, t_start):
    """Steps 1-5 into folder: build, train the VAE, train UNet + text encoder, save, check; returns the agreement."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    tokenizer, text_encoder, vae, unet = build_parts(args, ds['classes'], ds['image_size'], folder, device)
    images = torch.from_numpy(ds['train'][0]).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
    latents = train_vae(args, vae, images, device, t_start)
    train_unet(args, tokenizer, text_encoder, unet, latents, torch.from_numpy(ds['train'][1]).to(device),
               ds['classes'], device, t_start)
    if not all(torch.isfinite(p).all() for m in (vae, unet, text_encoder) for p in m.parameters()):
        fail(f'fit: the weights are not finite after the last step; nothing was saved (--lr {args.lr:g}: lower it)')
    # step 4: save as a Stable Diffusion pipeline; DDIM with SD's betas (clip_sample off: latents are not in [-1, 1])
    sampler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', clip_sample=False,
                            set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=sampler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / 'tokenizer_build')
    agreement = check_agreement(args, pipe, ds, device)
    write_json(dict(dataset=args.dataset, classes=ds['classes'], agreement=agreement, seconds=time.time() - t_start,
                    args=vars(args), check='logistic regression on real train pixels labels 25-step DDIM samples '
                    'at guidance 4'), folder / 'fit.json')
    return agreement

def swap_in(out, building, old):
    """Step 6: the new pipeline's entries into out, old ones set aside in old; out is unfinished until all are in."""
    STATUS['kept'] = f'{out} is unfinished (its pipeline was being replaced)'
    old.mkdir(exist_ok=True)
    manifest = CLAIMED[out.resolve()][1]
    for new in sorted(building.iterdir()):  # each file by its name
        names = [literal(f.relative_to(building).as_posix()) for f in [new, *new.rglob('*')] if f.is_file()]
        stale = [e for e in manifest['stale'] if e not in names]
        save_manifest(out, files=sorted({*manifest['files'], *names}), stale=stale)
        if (out / new.name).exists():
            os.replace(out / new.name, old / new.name)
        os.replace(new, out / new.name)
    shutil.rmtree(old)
    shutil.rmtree(building)

def fit_pipeline(args):
    """Claim --out, build in OUT/.building, swap in, finish; a fit failing before the swap leaves --out as it was."""
    t_start, out, device = time.time(), Path(args.out), torch.device(args.device)
    ds = load_dataset(args.dataset, args.data_root, classes=args.classes)
    if args.dataset.startswith('folder:'):
        fail('fit keeps the training set in memory (digits, CIFAR): for image folders use a pretrained pipeline')
    check_memory(3 * ds['train'][0].size * 4, f'the {args.dataset} training set as float', 'use a pretrained pipeline',
                 args.device)
    before = read_json(out / MANIFEST, 'pass another --out') if (out / MANIFEST).is_file() else None
    settings, scratch = {k: getattr(args, k) for k in FIT_FLAGS}, ['.building/', '.old/']
    # --overwrite of a finished pipeline claims it as it is: on disk it stays complete, and in use, until the swap
    replacing = bool(args.overwrite and before and before.get('complete') is True
                     and isinstance(before.get('settings'), dict))
    manifest = claim(out, '--out', 'generate.py fit', before['settings'] if replacing else settings,
                     args.overwrite and not replacing, True if replacing else 'unfinished', 'a pipeline made by '
                     'generate.py fit', 'pass --overwrite to replace it once the new one is complete, or another --out')
    building, old = out / '.building', out / '.old'
    record(out, *scratch)  # nothing is written if the manifest names them already
    if replacing:  # the new settings go to disk with the swap's first entry
        manifest.update(settings=settings, stale=[e for e in manifest['files'] if e not in scratch], complete=False)
    for leftover in (building, old):  # a killed fit's; this process holds the folder now
        shutil.rmtree(leftover, ignore_errors=True)
    STATUS['kept'] = f'{out} is as it was' + (' (the pipeline in it unchanged)' if before else '')
    try:
        agreement = train_pipeline(args, ds, building, device, t_start)
    except BaseException as e:  # an error, NaN or Ctrl-C before the swap: the folder as it was
        shutil.rmtree(building, ignore_errors=True)
        if before is None:
            (out / MANIFEST).unlink(missing_ok=True)
        elif before['complete']:
            save_manifest(out, **before)
        if isinstance(e, OSError):  # e.g. a full disk in save_pretrained
            fail(f'could not write the pipeline in {out} ({e}); {STATUS["kept"]}: free space or pass another --out')
        raise
    swap_in(out, building, old)
    finish(out)
    print(f'fit: {time.time() - t_start:.0f}s; class agreement of generated images {100 * agreement:.1f}% '
          f'(real-digit classifier, {args.check_per_class}/class); saved {out}')


# ------------------------------------------------------------------------------------------------
# sio, oal, fractals: fixed units of work (batches, pipeline calls, chunks), unit r*world + rank in round r of each
# rank; the finished ones are recorded as `done` in the folder's manifest.

def add_done(done, first, stop):
    """done: sorted, disjoint [first, stop) spans of finished units; returned with [first, stop) added."""
    merged = []
    for a, b in sorted(done + [[first, stop]]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged

def is_done(done, unit):
    return any(a <= unit < b for a, b in done)

def verified(done, finished):
    """The recorded units whose files are all there and readable (finished(unit)): the rest are made again."""
    kept = []
    for unit in [u for a, b in done for u in range(a, b) if finished(u)]:
        kept = add_done(kept, unit, unit + 1)
    return kept

def run_units(num_units, done, work, args, out, kept, rank, world, device):
    """work(unit) for each unit not done (None, or a one-line error), at most --max-batches rounds; after each
    round its units are recorded done (rank 0 writes the manifest). Returns done."""
    remaining, rounds = num_units - sum(b - a for a, b in done), 0
    with tqdm(total=min(math.ceil(remaining / world), args.max_batches or math.inf), desc=args.command,
              disable=rank != 0 or not remaining) as bar:
        for r in range(math.ceil(num_units / world)):
            units = range(r * world, min(r * world + world, num_units))
            if all(is_done(done, u) for u in units):
                continue
            if args.max_batches is not None and rounds == args.max_batches:
                break
            unit = units.start + rank
            error = work(unit) if unit in units and not is_done(done, unit) else None
            if world > 1:  # every rank stops when one fails
                ok = torch.tensor(0.0 if error else 1.0, device=device)
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                error = error or (None if ok else '')
            if error is not None:
                fail(error) if error else sys.exit(2)
            done, rounds = add_done(done, units.start, units.stop), rounds + 1
            if rank == 0:
                save_manifest(out, done=done)
                STATUS['kept'] = kept(done)
            bar.update()
    return done

def check_disk(out, nbytes, what, fix):  # refuse up front what the disk under out cannot hold, with the estimate
    folder = next(p for p in [Path(out).absolute(), *Path(out).absolute().parents] if p.exists())
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        fail(f'{what} need about {nbytes / 2 ** 30:,.1f} GiB and {folder} has {free / 2 ** 30:,.1f} GiB free: {fix}')

def peek_done(out, settings, overwrite):
    """The units an earlier run in out recorded as done under these settings (read before the claim)."""
    before = read_json(out / MANIFEST, 'pass another --out') if (out / MANIFEST).is_file() else {}
    return before.get('done', []) if before.get('settings') == settings and not overwrite else []

def sio(args):
    """Class-balanced synthetic ID images, image i = sio_image(i) and batch b = indices [b*B, (b+1)*B), as class
    folders of PNGs, then images.npy/labels.npy read back from them (the same bytes in both formats)."""
    rank, world, device = setup_distributed(args.device)
    ds = load_dataset(args.dataset, args.data_root, classes=args.classes)
    classes, size, out, B, per_class = ds['classes'], ds['image_size'], Path(args.out), args.batch_size, args.per_class
    names = class_prompt_names(classes, args.dataset, args.class_names)
    pipe = load_pipeline(args.pipeline, device, args.dtype, args.scheduler, args.dataset)
    check_pipeline(pipe, args, [args.prompt.format(name) for name in names])
    total, npy = len(classes) * per_class, args.npy if args.npy is not None else not args.dataset.startswith('folder:')
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    settings = dict(dataset=args.dataset, pipeline=pipeline_stamp(args.pipeline), prompt_template=args.prompt,
                    class_names=names, seed=args.seed, steps=args.steps, guidance=args.guidance,
                    scheduler=args.scheduler, per_class=per_class, batch_size=B, npy=npy,
                    dtype=args.dtype if device.type == 'cuda' else 'fp32')
    count = lambda done: sum(min(b * B, total) - a * B for a, b in done)
    todo = total - count(peek_done(out, settings, args.overwrite))
    part = min(todo, (args.max_batches or math.inf) * B * world)
    check_disk(out, part * max(PNG_BYTES, size * size * 3) + (part == todo) * npy * total * (size * size * 3 + 8),
               f'{part:,} images at {size}x{size}' + ' and images.npy' * npy * (part == todo),
               'free some space, pass --max-batches N to make part of the set now, or another --out')
    check_memory(3 * B * 3 * side * side * 4, f'a batch of {B} images at {side}x{side}', 'pass a smaller --batch-size',
                 args.device)
    path_of = lambda i: out / f'{i // per_class:03d}' / f'{i % per_class}.png'
    batch_of = lambda b: range(b * B, min(b * B + B, total))

    def claim_set():
        manifest = claim(out, '--out', 'generate.py sio', settings, args.overwrite, True, 'a set', 'pass --overwrite '
                         'to start afresh, or another --out', inputs(args))
        record(out, f'{{000..{len(classes) - 1:03d}}}/{{0..{per_class - 1}}}.png', 'meta.json',
               *['images.npy', 'labels.npy'] * npy)
        for c in range(len(classes)):
            (out / f'{c:03d}').mkdir(exist_ok=True)
        return verified(manifest['done'], lambda b: all(readable_image(path_of(i)) for i in batch_of(b)))
    done = on_rank0(rank, world, claim_set)
    if rank == 0:
        print(f'sio: {len(classes)} classes x {per_class} = {total} images, {count(done)} already done; prompt '
              f'"{args.prompt}", {args.steps} steps, guidance {args.guidance}, {world} process(es)')
    t0, written, made_before = time.time(), [0], count(done)

    @torch.no_grad()
    def make_batch(b):
        batch = batch_of(b)
        prompts = [args.prompt.format(names[sio_image(i, per_class, args.seed)[0]]) for i in batch]
        generators = [torch.Generator(device).manual_seed(sio_image(i, per_class, args.seed)[2]) for i in batch]
        images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generators,
                      output_type='np').images
        if not np.isfinite(images).all():
            return (f'--pipeline {args.pipeline} gives NaN/inf images (batch {b}); nothing of it was kept: pass '
                    f'--dtype fp32, or another --pipeline')
        for i, image in zip(batch, resize_uint8(images, size)):
            save_png(image, path_of(i))
        written[0] += len(batch)
    kept = lambda done: f'{count(done):,} of {total:,} images in {out}'
    done = run_units(math.ceil(total / B), done, make_batch, args, out, kept, rank, world, device)
    if world > 1:
        print(f'sio rank {rank}: wrote {written[0]} files')
    on_rank0(rank, world, lambda: end_sio(args, ds, names, pipe, done, npy, out, t0, count(done) - made_before))
    if world > 1:
        dist.destroy_process_group()

def end_sio(args, ds, names, pipe, done, npy, out, t0, made):
    """meta.json with the counts so far; a complete set also gets images.npy/labels.npy and its completion record."""
    classes, size, per_class, B = ds['classes'], ds['image_size'], args.per_class, args.batch_size
    total, manifest = len(classes) * per_class, CLAIMED[out.resolve()][1]
    counts = [sum(max(0, min(b * B, total, (c + 1) * per_class) - max(a * B, c * per_class)) for a, b in done)
              for c in range(len(classes))]
    complete, fresh = sum(counts) == total, lambda name: (out / name).is_file() and name not in manifest['stale']
    if complete and npy and not (fresh('images.npy') and fresh('labels.npy')):  # the SIO-release pair, image by image
        from PIL import Image

        def write_images(tmp):
            images = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.uint8, shape=(total, size, size, 3))
            for i in range(total):
                with Image.open(out / f'{i // per_class:03d}' / f'{i % per_class}.png') as image:
                    images[i] = np.asarray(image.convert('RGB'))
            images.flush()
        write_atomic(out / 'images.npy', write_images)
        save_npy(np.repeat(np.arange(len(classes)), per_class), out / 'labels.npy')
    write_json(dict(dataset=args.dataset, classes=classes, prompts=[args.prompt.format(n) for n in names],
                    generator=args.pipeline, prompt_template=args.prompt, seed=args.seed, steps=args.steps,
                    guidance=args.guidance, scheduler=type(pipe.scheduler).__name__, per_class=per_class, counts=counts,
                    image_size=size, complete=complete), out / 'meta.json')
    if complete:
        finish(out, keep={f'{c:03d}/{n}.png' for c in range(len(classes)) for n in range(per_class)})
    seconds = time.time() - t0
    print(f'sio: {made} images in {seconds:.1f}s ({made / max(seconds, 1e-9):.2f} images/s); '
          + ('complete' if complete else f'incomplete: continue with {STATUS["resume"]}') + f' -> {out}')

def check_class_sizes(args, labels, classes):
    """The k-NN sampler against the smallest class: every class gives as many teacher features as it (OAL stacks
    them); K is clipped to n - 1, the boundary cannot be."""
    sizes = np.bincount(labels, minlength=len(classes))
    c = int(sizes.argmin())
    n, where = min(args.features_per_class, int(sizes[c])), f'class {classes[c]} has {sizes[c]} training images'
    if n < 2:
        fail(f'{where}: the k-NN sampler needs 2 or more per class: add images to it, or leave it out with --classes')
    if args.boundary > n:
        fail(f'--boundary {args.boundary} is more than the {n} teacher features per class ({where}, '
             f'--features-per-class {args.features_per_class}): pass --boundary {n} or less')
    if n < args.features_per_class or args.knn_k > n - 1:
        print(f'note: {where}: every class gives {n} teacher features (--features-per-class {args.features_per_class})'
              + f' and --knn-k {args.knn_k} is clipped to {n - 1}' * (args.knn_k > n - 1), file=sys.stderr)

def prepare_oal(args, device, rank):
    """Every input of oal (dataset, class words, teacher and its val accuracy, pipeline) and the outliers' settings,
    read and checked before --out is claimed."""
    ds = load_dataset(args.dataset, args.data_root, classes=args.classes)
    classes, names = ds['classes'], class_prompt_names(ds['classes'], args.dataset, args.class_names)
    if args.dataset == 'cifar100' and args.class_names is None and args.inject == 'published':
        names = OAL_CIFAR100_NAMES  # the authors' prompt words ('apples', 'computer keyboard'), their tokens' words
    if args.inject == 'published' and len(classes) > len(OAL_INJECT_LABELS):
        fail(f"--inject published takes the token from OAL's list of {len(OAL_INJECT_LABELS)} CIFAR-100 labels, and "
             f'{args.dataset} has {len(classes)} classes: pass --inject fixed')
    check_class_sizes(args, ds['train'][1], classes)
    if args.teacher == 'baseline':
        args.teacher = f"runs/{args.dataset.replace(':', '_').replace('/', '_')}_ce_s0"
        if not Path(args.teacher).exists():
            fail(f'no teacher at {args.teacher}: train one with python train_sio.py --dataset {args.dataset} '
                 f'--out {args.teacher}, or pass --teacher RUN_OR_HUB_ID')
    stats = (ds['mean'], ds['std']) if args.teacher_norm == 'published' else None  # OAL fed its teacher these
    forward, teacher = load_teacher(args.teacher, device, classes, args.teacher_class_order, stats)
    acc = (teacher_accuracy(forward, teacher, *ds['val'], device, args.teacher_min_acc, args.dataset)
           if isinstance(ds['val'][0], np.ndarray) else None)  # folder datasets: file lists, not checked
    teacher = dict({k: v for k, v in teacher.items() if k not in ('module', 'feeder')}, val_acc=acc)
    anchor, repeats = args.anchor or ('token' if len(classes) >= 100 else 'pooled'), args.repeats or len(classes)
    knn = dict(teacher=teacher['name'], features_per_class=args.features_per_class, knn_select=args.knn_select,
               knn_k=args.knn_k, knn_sigma=args.knn_sigma, knn_draws=args.knn_draws, boundary=args.boundary,
               keep=args.keep, repeats=repeats, anchor=anchor, class_names=names, seed=args.seed, dataset=args.dataset,
               crop=args.crop, class_order=teacher['class_order'], teacher_norm=args.teacher_norm)  # names: anchors
    if stamp := teacher_stamp(teacher['name'], args.teacher):  # a retrained teacher must not reuse old outliers
        knn['teacher_stamp'] = stamp
    if args.classes:  # the class names come from the folders, so a subset is told apart by its list
        knn['classes'] = classes
    settings = dict(pipeline=pipeline_stamp(args.pipeline), scheduler=args.scheduler, steps=args.steps,
                    guidance=args.guidance, prompt=args.prompt, seed=args.seed, inject=args.inject,
                    samples_per_iteration=args.samples_per_iteration, iterations=args.iterations,
                    batch_size=args.batch_size, dtype=args.dtype if device.type == 'cuda' else 'fp32', knn=knn)
    pipe = load_pipeline(args.pipeline, device, args.dtype, args.scheduler, args.dataset)
    check_pipeline(pipe, args, [args.prompt.format(name) for name in names])
    return dict(ds=ds, classes=classes, names=names, forward=forward, teacher=teacher, pipe=pipe, anchor=anchor,
                repeats=repeats, knn_settings=knn, settings=settings)

def oal(args):
    """OAL's outliers: teacher features of the ID set -> k-NN low-density samples per class (knn_outliers.npy)
    -> diffusion samples with one written into the class token -> pooled final latents (diffusion_outliers.npy)."""
    rank, world, device = setup_distributed(args.device)
    job, out, n = prepare_oal(args, device, rank), Path(args.out), args.samples_per_iteration
    pipe, classes, d, fpc = job['pipe'], job['classes'], job['teacher']['feature_dim'], args.features_per_class
    per_call, side = max(1, args.batch_size // n), pipe.unet.config.sample_size * pipe.vae_scale_factor
    num_calls, pool = math.ceil(args.iterations / per_call), job['repeats'] * args.boundary * args.keep
    check_memory(4 * (3 * args.boundary * args.knn_draws * d + min(8192, args.boundary * args.knn_draws) * fpc),
                 f'the k-NN sampler ({args.boundary} x {args.knn_draws} candidates of {d} dims)',
                 'pass a smaller --knn-draws or --boundary', args.device)
    iterations = lambda done: sum(min(b * per_call, args.iterations) - a * per_call for a, b in done)
    todo = args.iterations - iterations(peek_done(out, job['settings'], args.overwrite))
    check_disk(out, todo * n * (max(PNG_BYTES, side * side * 3) + PNG_BYTES), f'{todo * n:,} outlier images at '
               f'{side}x{side} and their latents', 'free some space, pass --max-batches N to make part of them now, '
               'or another --out')
    calls_of = lambda k: range(k * per_call, min(k * per_call + per_call, args.iterations))
    files_of = lambda i: [f'latents/{i:04d}.npy'] + [
        f'images/{i:04d}_{k}_{classes[oal_draw(i, args.seed, len(classes), pool)[0]]}.png' for k in range(n)]

    def claim_outliers():
        manifest = claim(out, '--out', 'generate.py oal', job['settings'], args.overwrite, True, 'outliers', 'pass '
                         '--overwrite to start afresh, or another --out', inputs(args))
        last = f'{args.iterations - 1:04d}'
        record(out, *[f'images/{{0000..{last}}}_{{0..{n - 1}}}_{literal(c)}.png' for c in classes],  # a class each
               f'latents/{{0000..{last}}}.npy', 'knn_outliers.npy', 'knn_meta.json', 'diffusion_outliers.npy',
               'meta.json')
        for folder in ('images', 'latents'):
            (out / folder).mkdir(exist_ok=True)
        return verified(manifest['done'], lambda k: all((out / f).is_file() for i in calls_of(k) for f in files_of(i)))
    done = on_rank0(rank, world, claim_outliers)
    on_rank0(rank, world, lambda: knn_step(args, job, out, device))
    knn = torch.from_numpy(np.load(out / 'knn_outliers.npy'))
    token_dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    proj = projection(knn.shape[-1], token_dim, args.seed) if knn.shape[-1] != token_dim else None  # to token space
    t0, before = time.time(), iterations(done)
    done = run_units(num_calls, done, lambda k: diffusion_call(args, job, knn, proj, calls_of(k), out, device), args,
                     out, lambda done: f'{iterations(done)} of {args.iterations} iterations in {out}', rank, world,
                     device)
    meta = dict(dataset=args.dataset, classes=classes, prompts=[args.prompt.format(c) for c in job['names']],
                teacher=job['teacher'], pipeline=args.pipeline, scheduler=type(pipe.scheduler).__name__,
                inject=args.inject, steps=args.steps, guidance=args.guidance, prompt=args.prompt, seed=args.seed,
                iterations=args.iterations, samples_per_iteration=n, knn_outliers=list(knn.shape),
                anchor=job['anchor'], knn_select=args.knn_select, projection=None if proj is None else dict(
                    kind='seeded random orthogonal', seed=args.seed, shape=[knn.shape[-1], token_dim]))
    on_rank0(rank, world, lambda: end_oal(args, meta, done == [[0, num_calls]], files_of, out,
                                          f'{iterations(done) - before} iterations in {time.time() - t0:.1f}s'))
    if world > 1:
        dist.destroy_process_group()

def knn_step(args, job, out, device):
    """Steps 1-2: teacher features of up to --features-per-class training images per class, with training
    augmentation -> k-NN outliers scaled to the class anchor norms; reused when recorded under these settings."""
    manifest, files = CLAIMED[out.resolve()][1], ('knn_outliers.npy', 'knn_meta.json')
    if all(f in manifest['files'] and f not in manifest['stale'] and (out / f).is_file() for f in files):
        return
    t0, classes, (train_x, train_y), teacher = time.time(), job['classes'], job['ds']['train'], job['teacher']
    if not isinstance(train_x, np.ndarray):
        train_x = read_images(train_x, teacher['image_size'])
    torch.manual_seed(args.seed)
    size = teacher['image_size'] if args.crop == 'published' else None  # OAL: Resize(224), flip, RandomCrop(224, 4)
    feats = teacher_features(job['forward'], train_x, train_y, len(classes), args.features_per_class,
                             *RECIPE_AUGMENT[args.dataset if args.dataset in RECIPE_AUGMENT else 'folder'], size,
                             device, args.seed)
    if not torch.isfinite(feats).all():
        fail(f'--teacher {args.teacher} gives NaN/inf features of the training images: pass another --teacher')
    norms = class_anchor_norms(job['pipe'], job['names'], job['anchor'])
    if not np.isfinite(norms).all():
        fail(f'--pipeline {args.pipeline} gives NaN/inf class anchors (its text encoder): pass another --pipeline')
    g = torch.Generator().manual_seed(args.seed)
    knn = torch.stack([knn_outliers(feats[c], args.knn_k, args.boundary, args.knn_sigma, args.knn_draws, args.keep,
                                    job['repeats'], args.knn_select, g) * norms[c] for c in range(len(classes))])
    if not torch.isfinite(knn).all():
        fail(f"the k-NN outliers are NaN/inf at --knn-sigma {args.knn_sigma:g}: pass a smaller --knn-sigma (the "
             f"paper's 0.07)")
    save_npy(knn.cpu().numpy().astype(np.float32), out / 'knn_outliers.npy')
    write_json(dict(job['knn_settings'], anchor_norms=norms), out / 'knn_meta.json')
    print(f'knn: teacher features {tuple(feats.shape)} -> outliers {tuple(knn.shape)} ({args.knn_select} selection, '
          f"{job['anchor']} anchor, mean norm {np.mean(norms):.3f}) in {time.time() - t0:.1f}s")

@torch.no_grad()
def diffusion_call(args, job, knn, proj, call, out, device):
    """Step 3, one pipeline call for the iterations in call: each draws its class and outlier from (seed, i), encodes
    the prompt with the outlier written into the class tokens and has its own noise; the pooled final latents are the
    outliers (the images are for looking at). --batch-size = --samples-per-iteration is the paper's one call per
    iteration, bit for bit (a larger batch changes only float rounding)."""
    from diffusers.utils.torch_utils import randn_tensor
    n, pipe, names, classes = args.samples_per_iteration, job['pipe'], job['names'], job['classes']
    cfg = args.guidance > 1 and pipe.unet.config.time_cond_proj_dim is None  # as the pipeline decides
    shape = (n, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)

    def encode(i):  # iteration i's class, prompt embeddings (outlier injected) and noise
        c, row = oal_draw(i, args.seed, len(classes), knn.shape[1])
        vector = knn[c, row] @ proj if proj is not None else knn[c, row]
        with injected(pipe.text_encoder, injected_tokens(pipe.tokenizer, names, c, args.inject), vector):
            embed, negative = pipe.encode_prompt(args.prompt.format(names[c]), device, n, cfg)
        generator = torch.Generator(device).manual_seed(args.seed * 1000 + i)
        return c, embed, negative, randn_tensor(shape, generator=generator, device=device, dtype=embed.dtype)
    drawn, embeds, negatives, noise = zip(*[encode(i) for i in call])
    latents = pipe(prompt_embeds=torch.cat(embeds), negative_prompt_embeds=torch.cat(negatives) if cfg else None,
                   latents=torch.cat(noise), num_inference_steps=args.steps, guidance_scale=args.guidance,
                   output_type='latent').images
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    if not torch.isfinite(latents).all():
        return (f'--pipeline {args.pipeline} gives NaN/inf latents (iterations {call.start}-{call.stop - 1}); nothing '
                f'of them was kept: pass --dtype fp32, or another --pipeline')
    images = (decoded.float().clamp(-1, 1) * 127.5 + 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    pooled = pooled_latents(latents).cpu().numpy()
    for j, (i, c) in enumerate(zip(call, drawn)):
        for k, image in enumerate(images[j * n:(j + 1) * n]):
            save_png(image, out / 'images' / f'{i:04d}_{k}_{classes[c]}.png')
        save_npy(pooled[j * n:(j + 1) * n].astype(np.float32), out / 'latents' / f'{i:04d}.npy')

def end_oal(args, meta, complete, files_of, out, made):
    """diffusion_outliers.npy from the per-iteration latents once all are there; meta.json; the completion record."""
    files = [out / 'latents' / f'{i:04d}.npy' for i in range(args.iterations)]
    if complete:
        save_npy(np.concatenate([np.load(f) for f in files]), out / 'diffusion_outliers.npy')
    knn_meta = read_json(out / 'knn_meta.json', f'pass --overwrite to make {out} again')
    write_json(dict(meta, anchor_norms=knn_meta['anchor_norms'], diffusion_outliers=[
        args.iterations * args.samples_per_iteration, int(np.load(files[0]).shape[-1])] if complete else None,
        complete=complete), out / 'meta.json')
    if complete:
        finish(out, keep={f for i in range(args.iterations) for f in files_of(i)})
    print(f'oal: {made}; ' + ('complete' if complete else f'incomplete: continue with {STATUS["resume"]}')
          + f' -> {out}')

def fractals(args):
    """--count IFS fractal PNGs, picture i from (seed, i), in chunks of 100 recorded done (damaged ones remade)."""
    out, chunk, t0, made = Path(args.out), 100, time.time(), [0]
    settings = dict(count=args.count, size=args.size, seed=args.seed)
    todo = args.count - min(args.count, chunk * sum(b - a for a, b in peek_done(out, settings, args.overwrite)))
    check_disk(out, todo * max(PNG_BYTES, args.size ** 2 * 3), f'{todo:,} fractals at {args.size}x{args.size}',
               'free some space, or pass another --out')
    check_memory(64 * args.size ** 2, f'a {args.size}x{args.size} fractal', 'pass a smaller --size', 'cpu')
    manifest = claim(out, '--out', 'generate.py fractals', settings, args.overwrite, True, 'a fractal set', 'pass '
                     '--overwrite to start afresh, or another --out')
    record(out, f'{{00000..{args.count - 1:05d}}}.png')
    path_of = lambda i: out / f'{i:05d}.png'
    chunk_of = lambda k: range(k * chunk, min(k * chunk + chunk, args.count))

    def make(indices):
        for i in indices:
            save_png(ifs_fractal(np.random.RandomState([args.seed, i]), args.size), path_of(i))
            made[0] += 1
    make([i for a, b in manifest['done'] for k in range(a, b) for i in chunk_of(k) if not readable_image(path_of(i))])
    done = run_units(math.ceil(args.count / chunk), manifest['done'], lambda k: make(chunk_of(k)), args, out,
                     lambda done: f'{min(args.count, chunk * sum(b - a for a, b in done)):,} of {args.count:,} '
                     f'fractals in {out}', 0, 1, 'cpu')
    finish(out, keep={path_of(i).name for i in range(args.count)}, done=done)
    print(f'fractals: {made[0]} made, {args.count - made[0]} already there, in {time.time() - t0:.1f}s -> {out}')


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

# Class names in prompts, and the files generate.py writes.

def prompt_name(class_name):  # torchvision's 'aquarium_fish' -> 'aquarium fish'
    return class_name.replace('_', ' ')

def class_prompt_names(classes, dataset, names_file=None):
    """Each class's words in a prompt: --class-names FILE ('wnid name, other name' lines, whose first name is used, or
    one name a line in class order), else a mapping file in a folder dataset's root, else the class names."""
    if names_file is None and dataset.startswith('folder:'):
        names_file = next((f for f in (Path(dataset[len('folder:'):]) / m for m in MAPPING_FILES) if f.exists()), None)
    wordnet = lambda word: re.fullmatch(r'n\d{8}', word)
    if names_file is None:
        wnid = next((c for c in classes if wordnet(c)), None)
        if wnid:  # 'a photo of a n02085620' means nothing
            fail(f'class folders such as {wnid} are WordNet ids: pass --class-names FILE with lines "n01440764 tench, '
                 f'Tinca tinca" (ImageNet\'s LOC_synset_mapping.txt) or one name per line in class order')
        return [prompt_name(c) for c in classes]
    path = Path(names_file)
    if not path.is_file():
        fail(f'--class-names {path} {"is a folder" if path.is_dir() else "does not exist"}: pass a text file of names')
    try:
        lines = [line.strip() for line in path.read_text(encoding='utf-8-sig').splitlines() if line.strip()]  # no BOM
    except (OSError, UnicodeDecodeError) as e:
        fail(f'--class-names {path} cannot be read ({type(e).__name__}): pass a text file with one class name per line')
    pairs = [line.split(None, 1) for line in lines]
    if pairs and all(len(pair) == 2 and wordnet(pair[0]) for pair in pairs):
        mapping = {wnid: names.split(',')[0].strip() for wnid, names in pairs}
        missing = [c for c in classes if c not in mapping]
        if missing:
            fail(f'{names_file} lacks class {missing[0]} ({len(missing)} of {len(classes)} missing): add their lines')
        names = [mapping[c] for c in classes]
    elif len(lines) != len(classes):
        fail(f'{names_file} has {len(lines)} names for {len(classes)} classes: give one a line, in folder order')
    else:  # by position: say which name each class got (a --classes list is taken in sorted order)
        names = [prompt_name(line).strip() for line in lines]
        pairs = ', '.join(f'{c} = {n}' for c, n in zip(classes[:4], names))
        say(f'{names_file}, by position: {pairs}' + ', ...' * (len(names) > 4))
    if '' in names:
        fail(f'{names_file} gives class {classes[names.index("")]} an empty name: write its name there')
    return names

def check_memory(nbytes, what, fix, device_name):  # refused up front: nbytes over the free memory (the GPU's on CUDA)
    if torch.device(device_name).type == 'cuda':
        free = torch.cuda.mem_get_info(torch.device(device_name))[0]
    else:  # Linux's estimate; elsewhere not checked
        meminfo = Path('/proc/meminfo').read_text() if Path('/proc/meminfo').exists() else 'MemAvailable: inf'
        free = float(re.search(r'MemAvailable:\s+(\S+)', meminfo).group(1)) * 1024
    if nbytes > free:
        fail(f'{what} needs {nbytes / 2 ** 30:.1f} GiB and {device_name} has {free / 2 ** 30:.1f} GiB free: {fix}')

def resize_uint8(images, size):  # pipelines' floats in [0, 1], (N, H, W, 3) -> uint8 (N, size, size, 3), antialiased
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 255
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()

def readable_image(path):  # a finished image: there and decodable (one cut short or damaged is made again)
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, SyntaxError):  # missing, truncated, not an image
        return False

def save_png(image, path):
    from PIL import Image
    write_atomic(path, lambda tmp: Image.fromarray(image).save(tmp, format='PNG'))

def save_npy(array, path):
    def write(tmp):
        with open(tmp, 'wb') as f:  # a file object: np.save would add .npy to the temporary name
            np.save(f, array)
    write_atomic(path, write)

def write_json(obj, path):
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))

def inputs(args):  # (flag, path) of every input: an output folder must not be, hold or lie in one
    return [('--pipeline folder', args.pipeline), ('--teacher run', getattr(args, 'teacher', None)),
            ('--class-names file', args.class_names), ('--dataset folder', args.dataset.partition('folder:')[2])]

def pipeline_stamp(name):  # what output depends on of a pipeline: a hub id, or a folder's path, file sizes and times
    if not Path(name).is_dir():
        return name
    files = sorted(f for f in Path(name).rglob('*') if f.is_file() and f.name not in ('.lock', MANIFEST))
    stamp = ';'.join(f'{f.relative_to(name)}:{f.stat().st_size}:{f.stat().st_mtime_ns}' for f in files)
    return f'{os.path.abspath(name)} ({hashlib.sha1(stamp.encode()).hexdigest()[:12]})'


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

def load_pipeline(name, device, dtype_name, scheduler, dataset):
    """A diffusers text-to-image pipeline, from a folder (refused if its generate.py fit did not end) or a hub id."""
    import diffusers
    path, redo = Path(name), f'run the generate.py fit that made {name} again, or pass another --pipeline'
    if path.is_file() or not path.is_dir() and name.startswith(('.', '/', '~')):
        fail(f'--pipeline {name} ' + (f'is a file: pass the folder that holds model_index.json ({path.parent})'
             if path.is_file() else 'does not exist: make one with python generate.py fit --dataset DATASET --out '
             f'{name}, or pass a hub id'))
    made = read_json(path / MANIFEST, redo) if (path / MANIFEST).is_file() else {}
    if made and made.get('script') != 'generate.py fit':
        fail(f'--pipeline {name} holds a {made.get("script")} folder, not a pipeline: pass a fit folder or a hub id')
    if made.get('complete', True) is not True:
        fail(f'--pipeline {name} is unfinished (its generate.py fit did not end): {redo}')
    fitted_on = made['settings'].get('dataset', dataset) if isinstance(made.get('settings'), dict) else dataset
    if fitted_on != dataset and not (str(fitted_on).startswith('folder:') and dataset.startswith('folder:')):
        fail(f'--pipeline {name} was fitted on {fitted_on}, not --dataset {dataset}: ' + ('pass a hub id (fit takes '
             'digits and CIFAR only)' if dataset.startswith('folder:') else f'fit one on it (generate.py fit --dataset '
             f'{dataset}) or pass a hub id'))
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[dtype_name]
    options = dict(torch_dtype=dtype) if device.type == 'cuda' and dtype != torch.float32 else {}
    if not path.is_dir() or (path / 'safety_checker').exists():  # research data: no NSFW filter on outliers
        options.update(safety_checker=None, requires_safety_checker=False)
    if not path.is_dir():
        offline_if_unreachable()
        diffusers.utils.logging.set_verbosity_error()  # offline, the cache lookup would print lines before ours
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(name, **options)
    except Exception as e:
        where = 'a local pipeline folder' if path.is_dir() else f'hub id {name!r} (offline, or no diffusers pipeline)'
        fail(f'cannot load {where}: {type(e).__name__}; pass a local folder with --pipeline DIR, or make one with: '
             f'python generate.py fit --dataset DATASET --out DIR')
    for part in ('tokenizer', 'text_encoder', 'unet', 'vae', 'scheduler'):
        if getattr(pipe, part, None) is None:
            fail(f'--pipeline {name} has no {part}: pass a Stable-Diffusion-layout text-to-image pipeline')
    if scheduler == 'pndm':  # with skip_prk_steps: PLMS, as in the papers' Stable Diffusion scripts
        pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    elif scheduler == 'ddim':
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)

def check_pipeline(pipe, args, prompts):  # before --out: steps its scheduler has, prompts its text encoder reads whole
    config, tokenizer = pipe.scheduler.config, pipe.tokenizer
    if args.steps > (most := config.num_train_timesteps - config.get('steps_offset', 0)):
        fail(f'--steps {args.steps} is more than the {most} that {args.pipeline} schedules: pass fewer')
    tokens = {p: len(tokenizer(p, truncation=False, verbose=False).input_ids) for p in prompts}
    longest = max(tokens, key=tokens.get)
    if tokens[longest] > tokenizer.model_max_length:
        fail(f'the prompt {longest!r} is {tokens[longest]} tokens, {args.pipeline} reads {tokenizer.model_max_length}'
             f' (the class name would be cut): shorten --prompt or --class-names')


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

@torch.no_grad()
def teacher_features(forward, images, labels, num_classes, per_class, pad, flip, size, device, seed):
    """(C, n, d) teacher features of up to per_class training images per class, with training augmentation."""
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else nullcontext()
    rng = np.random.RandomState(seed)
    feats = []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))[:per_class]
        out = []
        for i in range(0, len(idx), 256):
            x = augment(torch.from_numpy(images[idx[i:i + 256]]).permute(0, 3, 1, 2).to(device), pad, flip, size)
            with autocast:
                out.append(forward(x)[1].float())
        feats.append(torch.cat(out))
    n = min(len(f) for f in feats)  # equal n per class for the (C, n, d) array
    return torch.stack([f[:n] for f in feats])

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
# Arguments

def template(flag, text, allowed):  # a template's {fields}, each one of allowed ('' is {}), else one line; {{ is a {
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(text)]
    except ValueError as e:
        fields = [(str(e), None, None)]
    if any(name is not None and (name not in allowed or spec or conversion) for name, spec, conversion in fields):
        fail(f'{flag} {text!r} may hold only {" ".join("{" + a + "}" for a in allowed)} as fields: write a literal '
             f'brace as {{{{ or }}}}')
    return [name for name, _, _ in fields if name is not None]

def add_fit_flags(f):
    eights = lambda v: v >= 8 and v % 8 == 0  # GroupNorm with 8 groups
    f.add_argument('--steps', type=POSITIVE, default=1000, help='UNet + text-encoder training steps')
    f.add_argument('--vae-steps', type=POSITIVE, default=200)
    f.add_argument('--batch-size', type=POSITIVE, default=192)
    f.add_argument('--lr', type=RATE, default=3e-3)
    f.add_argument('--unet-channels', type=number(str, 'a comma list of multiples of 8 (GroupNorm with 8 groups), '
                   'e.g. 16,32', lambda v: all(c.strip().isdigit() and eights(int(c)) for c in v.split(','))),
                   help='UNet level widths (default 16,16 for digits: 94-99.7%% agreement over 5 seeds; else 16,32)')
    f.add_argument('--vae-channels', type=number(int, 'a multiple of 8 (GroupNorm with 8 groups)', eights), default=16)
    f.add_argument('--text-dim', type=number(int, 'an even integer >= 2 (two attention heads)',
                                             lambda v: v >= 2 and v % 2 == 0), default=32)
    f.add_argument('--prompt-dropout', type=number(float, 'in [0, 1)', lambda v: 0 <= v < 1), default=0.1,
                   help='share of empty prompts, for classifier-free guidance')
    f.add_argument('--check-per-class', type=POSITIVE, default=50, help='samples per class for the agreement check')

def add_oal_flags(o):
    o.add_argument('--teacher', help='a run or .pt of ours, a timm or transformers model (hub id, folder, state_dict '
                                     'file), or baseline (= runs/<dataset>_ce_s0); default TEACHERS, else baseline')
    o.add_argument('--teacher-class-order', default='auto', choices=['auto', 'ignore'],
                   help="auto: match the teacher's label names to the classes; ignore: take its outputs in order")
    o.add_argument('--teacher-norm', default='published', choices=['published', 'own'],
                   help="published: the teacher sees the dataset's mean/std, as OAL fed it; own: its own config's")
    o.add_argument('--teacher-min-acc', type=SHARE, default=0.5, help="stop when the teacher's val top-1 is below this")
    o.add_argument('--crop', default='published', choices=['published', 'native'],
                   help="teacher features: resize to the teacher's size, then flip and pad-crop (OAL), or crop first")
    o.add_argument('--inject', default='published', choices=['published', 'fixed'],
                   help="published: the first token of OAL's CIFAR-100 label of the class; fixed: the prompt's class")
    o.add_argument('--features-per-class', type=POSITIVE, default=500)
    o.add_argument('--knn-select', default='faithful', choices=['faithful', 'fixed'],
                   help='faithful = the published (mis)indexing of the OAL code')
    o.add_argument('--knn-k', type=POSITIVE, default=300)
    o.add_argument('--knn-sigma', type=RATE, default=0.07)
    o.add_argument('--knn-draws', type=POSITIVE, default=1500, help='Gaussian candidates per boundary point')
    o.add_argument('--boundary', type=POSITIVE, default=50, help='boundary (lowest-density) points per class')
    o.add_argument('--keep', type=POSITIVE, default=2, help='candidates kept per boundary point')
    o.add_argument('--repeats', type=POSITIVE, help='k-NN repeats per class (default: the number of classes)')
    o.add_argument('--anchor', choices=['pooled', 'token'], help='class anchor norm: pooled text-encoder output '
                                                                 '(OAL on CIFAR-10) or token embedding (CIFAR-100)')
    o.add_argument('--iterations', type=POSITIVE, default=100)
    o.add_argument('--samples-per-iteration', type=POSITIVE, default=3)
    o.add_argument('--prompt', default=OAL_PROMPT, help='template over the class name')

def get_args(argv=None):
    p = Parser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    seed = number(int, 'an integer in [0, 2**31)', lambda v: 0 <= v < 2 ** 31)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--dataset', default='digits', help='digits | cifar10 | cifar100 | folder:PATH')
    common.add_argument('--classes', help="folder datasets: imagenet-10, imagenet-dogs (the SIO code's) or a list")
    common.add_argument('--data-root', default='./data', help='where torchvision datasets live or are downloaded to')
    common.add_argument('--out', required=True, help='output folder')
    common.add_argument('--seed', type=seed, help='default 0 (fit, sio) / 42 (oal, the paper)')
    common.add_argument('--device', type=device, default='cuda' if torch.cuda.is_available() else 'cpu')
    common.add_argument('--dtype', default='bf16', choices=['bf16', 'fp16', 'fp32'], help='on CUDA (CPU: fp32)')
    common.add_argument('--overwrite', action='store_true', help='start afresh over output of other settings')
    add_fit_flags(sub.add_parser('fit', parents=[common], help='train a small SD-layout pipeline on the ID set'))
    denoising = number(int, 'an integer in [1, 1000] (denoising steps)', lambda v: 1 <= v <= 1000)
    guidance = number(float, 'a number >= 0 (classifier-free guidance; 1 = none)', lambda v: 0 <= v < math.inf)
    for name, text, steps, scale, scheduler in (('sio', 'synthetic ID images for SIO', 25, 4.0, 'pipeline'),
                                                ('oal', 'latent-space outliers for OAL', 50, 7.5, 'pndm')):
        s = sub.add_parser(name, parents=[common], help=text)
        s.add_argument('--pipeline', help=f'pipeline folder or hub id (default pipelines/<dataset>, else {SD_HUB_ID})')
        s.add_argument('--steps', type=denoising, default=steps, help='denoising steps (default %(default)s)')
        s.add_argument('--guidance', type=guidance, default=scale, help='default %(default)s')
        s.add_argument('--batch-size', type=POSITIVE, default=16, help='images per pipeline call (fixed index ranges)')
        s.add_argument('--scheduler', choices=['pipeline', 'pndm', 'ddim'], default=scheduler,
                       help="default %(default)s; pndm is PLMS, pipeline the pipeline's own")
        s.add_argument('--max-batches', type=POSITIVE, help='leave after this many batches (run again to continue)')
        s.add_argument('--class-names', help="a class's words in prompts: 'wnid name, other' lines or one name a line")
    s = sub.choices['sio']
    s.add_argument('--per-class', type=POSITIVE, default=100)
    s.add_argument('--npy', action=argparse.BooleanOptionalAction,
                   help='also write images.npy/labels.npy (SIO\'s format; default: not for folder datasets)')
    s.add_argument('--prompt', default='a photo of a {}', help='template over the class name')
    add_oal_flags(sub.choices['oal'])
    r = sub.add_parser('fractals', help="PixMix's mixing pictures made offline: random IFS fractals as PNGs")
    r.add_argument('--out', required=True, help='output folder')
    r.add_argument('--count', type=POSITIVE, default=1000)
    r.add_argument('--size', type=number(int, 'an integer >= 8', lambda v: v >= 8), default=64, help='side in pixels')
    r.add_argument('--seed', type=seed, default=0)
    r.add_argument('--overwrite', action='store_true', help='start afresh over a set of other settings')
    r.set_defaults(max_batches=None)
    args = p.parse_args(argv)
    if args.command == 'fractals':
        return args
    args.seed = args.seed if args.seed is not None else 42 if args.command == 'oal' else 0
    if args.classes and not args.dataset.startswith('folder:'):
        fail(f'--classes is for folder:PATH datasets; --dataset {args.dataset} has fixed classes: drop --classes')
    if args.command == 'fit':
        args.unet_channels = args.unet_channels or ('16,16' if args.dataset == 'digits' else '16,32')
        return args
    local = Path('pipelines') / args.dataset.replace(':', '_').replace('/', '_')
    args.pipeline = args.pipeline or (str(local) if local.is_dir() else SD_HUB_ID)
    if len(template('--prompt', args.prompt, [''])) != 1:
        fail(f'--prompt {args.prompt!r} must hold {{}} once, where the class name goes (literal braces: {{{{ or }}}})')
    if args.command == 'oal':
        if args.keep > args.knn_draws:
            fail(f'--keep must be an integer in [1, --knn-draws ({args.knn_draws})], got {args.keep}')
        if args.features_per_class <= args.knn_k or args.features_per_class < args.boundary:
            fail(f'--features-per-class must be an integer > --knn-k ({args.knn_k}) and >= --boundary '
                 f'({args.boundary}), got {args.features_per_class}')
        args.teacher = args.teacher or TEACHERS.get(args.dataset, 'baseline')
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
    with user_errors(argv, drop=() if args.command == 'fit' else ('--overwrite',)):
        {'fit': fit_pipeline, 'sio': sio, 'oal': oal, 'fractals': fractals}[args.command](args)

if __name__ == '__main__':
    main()
