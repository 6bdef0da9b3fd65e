"""Train sluice's bundled default model pair on the standard library's Python source.

    python models/train.py --out DIR [--target-only | --draft-only] [--max-minutes M] [--steps N]
    python models/train.py --out DIR --distill-from models/sluice-pycoder [--distill-alpha 0.9] \
        [--distill-generate 16384] [--distill-prompts windows|file-starts] [--init-from DRAFT_DIR] [--lr LR]

writes ``DIR/sluice-pycoder/`` (the target), ``DIR/sluice-pycoder-draft/`` (its speculative
draft, same tokenizer), ``DIR/heldout_files.txt``, ``DIR/validation_files.txt`` and
``DIR/train_report.json``. Both models see the same batches, each with its own optimizer.

``--distill-from TARGET`` trains only a draft, with TARGET's tokenizer, on a mix of next-token
cross-entropy and the KL divergence from TARGET's own next-token distribution (an AWQ TARGET is
dequantized as sluice's CPU path does): a draft that predicts what the target predicts, not what
the text says, gets more of its guesses accepted in speculative decoding. ``--distill-generate N``
adds N sequences the target writes itself (greedy, from training-text prompts) to the draft's
batches (``--distill-generate-fraction`` of each): in speculative decoding the draft guesses
the target's own output, not the corpus. Their prompts are random windows of the training text,
or with ``--distill-prompts file-starts`` the first 32-256 tokens of training files (what a
client sending a file's head asks for). ``--init-from`` starts the draft from a checkpoint
(a second, shorter stage), ``--lr`` overrides the peak learning rate. When distilling, validation picks the weights with
the lowest KL(target || draft) on the validation files (on the target's own continuations of
validation prompts, made like the training ones, when there are generated sequences).

The cosine schedule's length is the smallest of ``--steps``, ``--max-epochs`` worth of tokens and
what fits in ``--max-minutes`` of training (from the measured step time), so the learning rate
has decayed to 10% of its peak when training stops. The weights with the lowest validation loss
are the ones saved. ``--max-minutes`` bounds the training loop only; corpus, tokenizer, final
evaluation and saving come on top (their times are in the report).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.corpus import SPLITS, load_corpus, token_stream, train_tokenizer  # noqa: E402

TARGET_NAME, DRAFT_NAME = "sluice-pycoder", "sluice-pycoder-draft"
MIN_LR_RATIO = 0.1
MAX_SHARD_SIZE = "15MB"  # every file stays under the 16 MB limit on what comes back from a GPU machine


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    peak_lr: float


SHAPES = {
    TARGET_NAME: ModelShape(512, 6, 8, 4, 1536, 1.5e-3),
    DRAFT_NAME: ModelShape(256, 4, 4, 2, 768, 2e-3),
}
TINY_SHAPES = {
    TARGET_NAME: ModelShape(32, 1, 2, 1, 64, 1e-2),
    DRAFT_NAME: ModelShape(16, 1, 2, 1, 32, 1e-2),
}


@dataclass(frozen=True)
class TrainConfig:
    out: str
    models: tuple[str, ...]
    seed: int
    device: str
    vocab_size: int
    seq_len: int
    batch_size: int
    steps: int | None
    max_minutes: float | None
    max_epochs: float
    warmup_steps: int
    weight_decay: float
    eval_every: int
    log_every: int
    max_files: int | None
    compile: bool
    tiny: bool
    distill_from: str | None = None
    distill_alpha: float = 0.9  # weight of the KL term against cross-entropy when distilling
    distill_generate: int = 0  # sequences the target writes for the draft's training
    distill_generate_fraction: float = 0.5  # of each batch, when there are any
    distill_prompts: str = "windows"  # where the generated sequences' prompts come from
    init_from: str | None = None  # a checkpoint to start the draft from
    lr: float | None = None  # peak learning rate instead of the shape's


@dataclass(slots=True)
class Trainee:
    """One model being trained, with its optimizer and what was measured on the way."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    peak_lr: float
    forward: Callable[..., Any] | None = None  # the (possibly compiled) model used for training steps
    loss_sum: torch.Tensor | None = None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_step: int = -1
    best_state: dict[str, torch.Tensor] | None = None


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--target-only", action="store_true")
    only.add_argument("--draft-only", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--vocab-size", type=int, default=None, help="default 8192 (300 with --tiny)")
    p.add_argument("--seq-len", type=int, default=None, help="default 512 (64 with --tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CUDA, 8 on CPU")
    p.add_argument("--steps", type=int, default=None, help="at most this many steps (20 with --tiny)")
    p.add_argument("--max-minutes", type=float, default=None, help="bound on the training loop's time")
    p.add_argument("--max-epochs", type=float, default=20.0, help="bound on passes over the training tokens")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=None, help="validation every N steps (default 100)")
    p.add_argument("--log-every", type=int, default=None, help="log every N steps (default 50)")
    p.add_argument("--max-files", type=int, default=None, help="a small corpus: first N training files")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--tiny", action="store_true", help="tiny models and corpus, for tests")
    p.add_argument("--distill-from", default=None,
                   help="train only the draft, with this target checkpoint's tokenizer, towards its distribution")
    p.add_argument("--distill-alpha", type=float, default=0.9, help="weight of the KL term (the rest: cross-entropy)")
    p.add_argument("--distill-generate", type=int, default=0,
                   help="with --distill-from: train also on this many sequences the target writes (greedy)")
    p.add_argument("--distill-generate-fraction", type=float, default=0.5,
                   help="the share of each batch taken from the target's sequences")
    p.add_argument("--distill-prompts", choices=("windows", "file-starts"), default="windows",
                   help="prompts of the generated sequences: random training windows, or training files' heads")
    p.add_argument("--init-from", default=None, help="start the draft from this checkpoint (with --distill-from)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the shape's)")
    a = p.parse_args(argv)
    if a.init_from is not None and a.distill_from is None:
        p.error("--init-from starts a distilled draft: it needs --distill-from")
    if not 0.0 <= a.distill_alpha <= 1.0:
        p.error(f"--distill-alpha must be in [0, 1], got {a.distill_alpha}")
    if not 0.0 < a.distill_generate_fraction < 1.0:
        p.error(f"--distill-generate-fraction must be in (0, 1), got {a.distill_generate_fraction}")
    if a.distill_generate < 0 or (a.distill_generate and a.distill_from is None):
        p.error("--distill-generate takes a count >= 0 and needs --distill-from")
    models = (TARGET_NAME,) if a.target_only else (DRAFT_NAME,) if a.draft_only else (TARGET_NAME, DRAFT_NAME)
    if a.distill_from is not None:
        if a.target_only:
            p.error("--distill-from trains the draft: it cannot go with --target-only")
        models = (DRAFT_NAME,)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    tiny = a.tiny
    return TrainConfig(
        out=a.out,
        models=models,
        seed=a.seed,
        device=device,
        vocab_size=a.vocab_size or (300 if tiny else 8192),
        seq_len=a.seq_len or (64 if tiny else 512),
        batch_size=a.batch_size or (64 if device.startswith("cuda") else 8),
        steps=a.steps if a.steps is not None else (20 if tiny else None),
        max_minutes=a.max_minutes,
        max_epochs=a.max_epochs,
        warmup_steps=a.warmup_steps,
        weight_decay=a.weight_decay,
        eval_every=a.eval_every or (10 if tiny else 100),
        log_every=a.log_every or (5 if tiny else 50),
        max_files=a.max_files if a.max_files is not None else (30 if tiny else None),
        compile=a.compile,
        tiny=tiny,
        distill_from=a.distill_from,
        distill_alpha=a.distill_alpha,
        distill_generate=a.distill_generate,
        distill_generate_fraction=a.distill_generate_fraction,
        distill_prompts=a.distill_prompts,
        init_from=a.init_from,
        lr=a.lr,
    )


def build_model(shape: ModelShape, vocab_size: int, seed: int, eos_id: int, pad_id: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def shape_of(config, peak_lr: float) -> ModelShape:
    """The ModelShape of a loaded Llama config."""
    return ModelShape(config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                      config.num_key_value_heads, config.intermediate_size, peak_lr)


def make_optimizer(model: torch.nn.Module, weight_decay: float, fused: bool) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # Norm gains are not decayed: shrinking them only rescales activations.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), fused=fused)


def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``MIN_LR_RATIO * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of ``seq_len + 1`` tokens (inputs and shifted targets)."""
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=generator)
    index = starts.to(stream.device, non_blocking=True)[:, None] + torch.arange(seq_len + 1, device=stream.device)
    return stream[index]


@torch.no_grad()
def generate_from_teacher(teacher: torch.nn.Module, stream: torch.Tensor, num: int, prompt_len: int,
                          seq_len: int, batch_size: int, generator: torch.Generator,
                          file_starts: torch.Tensor | None = None) -> torch.Tensor:
    """``num`` sequences of ``seq_len + 1`` tokens: a random ``prompt_len``-token window of
    ``stream``, then the teacher's greedy continuation (EOS included, as with ``ignore_eos``).
    With ``file_starts`` (positions in ``stream``), prompts are instead the first 32 to 256
    tokens (one length per batch) from a random one of them."""
    from transformers import DynamicCache

    # transformers 5.x names the argument ``cache`` (``past_key_values`` is deprecated there).
    cache_arg = "cache" if "cache" in inspect.signature(teacher.forward).parameters else "past_key_values"
    out = torch.empty((num, seq_len + 1), dtype=stream.dtype, device=stream.device)
    bar = _progress(num, "generate")
    for begin in range(0, num, batch_size):
        n = min(batch_size, num - begin)
        if file_starts is None:
            rows = sample_batch(stream, n, prompt_len - 1, generator)
        else:
            length = int(torch.randint(32, min(256, seq_len // 2) + 1, (), generator=generator))
            starts = file_starts[torch.randint(0, len(file_starts), (n,), generator=generator)].to(stream.device)
            rows = stream[starts[:, None] + torch.arange(length, device=stream.device)]
        cache = DynamicCache()
        tokens, fed = rows, rows
        while tokens.shape[1] < seq_len + 1:
            with autocast(stream.device):
                logits = teacher(input_ids=fed, use_cache=True, **{cache_arg: cache}).logits[:, -1]
            fed = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, fed], 1)
        out[begin:begin + len(rows)] = tokens
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return out


@torch.no_grad()
def greedy_agreement(a: torch.nn.Module, b: torch.nn.Module, rows: torch.Tensor, start: int) -> float:
    """How often two models' greedy next tokens agree on ``rows``, from position ``start`` on."""
    with autocast(rows.device):
        greedy = [m(input_ids=rows[:, :-1], use_cache=False).logits.argmax(-1)[:, start:] for m in (a, b)]
    return float((greedy[0] == greedy[1]).float().mean())


def file_starts(stream: torch.Tensor, eos_id: int, min_len: int) -> torch.Tensor:
    """Positions where a file begins in an EOS-separated ``stream`` and ``min_len`` tokens follow."""
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=stream.device),
                        torch.nonzero(stream[:-1] == eos_id).flatten() + 1])
    return starts[starts + min_len <= stream.numel()].cpu()


@torch.no_grad()
def kl_on_rows(teacher: torch.nn.Module, model: torch.nn.Module, rows: torch.Tensor, batch_size: int) -> float:
    """Mean KL(teacher || model) over every next-token position of ``rows``."""
    total = 0.0
    for i in range(0, rows.shape[0], batch_size):
        x = rows[i:i + batch_size, :-1]
        with autocast(rows.device):
            target, logits = (m(input_ids=x, use_cache=False).logits.float().flatten(0, 1) for m in (teacher, model))
        total += float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True, reduction="sum"))
    return total / (rows.shape[0] * (rows.shape[1] - 1))


def mixed_batch(stream: torch.Tensor, generated: torch.Tensor | None, fraction: float, batch_size: int,
                seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """A training batch: windows of ``stream``, and with ``generated`` about ``fraction`` of the
    rows drawn from it instead."""
    if generated is None:
        return sample_batch(stream, batch_size, seq_len, generator)
    num_generated = max(1, min(batch_size - 1, round(fraction * batch_size)))
    rows = torch.randint(0, generated.shape[0], (num_generated,), generator=generator).to(generated.device)
    return torch.cat([sample_batch(stream, batch_size - num_generated, seq_len, generator), generated[rows]])


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(models: list[torch.nn.Module], stream: torch.Tensor, seq_len: int, batch_size: int) -> dict:
    """Mean next-token NLL of each model over non-overlapping ``seq_len`` windows of ``stream``
    (every token but the first is predicted once), the fraction of positions where all the
    models' greedy next tokens agree, and each later model's mean KL from the first."""
    device = stream.device
    inputs, targets = stream[:-1], stream[1:]
    n_full = inputs.numel() // seq_len
    chunks = [
        (inputs[: n_full * seq_len].view(n_full, seq_len), targets[: n_full * seq_len].view(n_full, seq_len))
    ]
    if inputs.numel() % seq_len:
        chunks.append((inputs[n_full * seq_len :][None], targets[n_full * seq_len :][None]))
    nll = [torch.zeros((), dtype=torch.float64, device=device) for _ in models]
    kl = [torch.zeros((), dtype=torch.float64, device=device) for _ in models[1:]]
    agree = torch.zeros((), dtype=torch.long, device=device)
    for x_all, y_all in chunks:
        for i in range(0, x_all.shape[0], batch_size):
            x, y = x_all[i : i + batch_size], y_all[i : i + batch_size]
            greedy, first = [], None
            for k, model in enumerate(models):
                with autocast(device):
                    logits = model(input_ids=x, use_cache=False).logits.float()
                nll[k] += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").double()
                greedy.append(logits.argmax(-1))
                if len(models) == 1:
                    continue  # no KL to compute: spare the log-softmax over the vocabulary
                logp = F.log_softmax(logits.flatten(0, 1), -1)
                if first is None:
                    first = logp
                else:
                    kl[k - 1] += F.kl_div(logp, first, log_target=True, reduction="sum").double()
            agree += torch.stack([g == greedy[0] for g in greedy]).all(0).sum()
    count = targets.numel()
    return {"nll": [float(v) / count for v in nll], "kl": [float(v) / count for v in kl],
            "agreement": float(agree) / count, "tokens": count}


def unigram_nll(train: np.ndarray, heldout: np.ndarray, vocab_size: int) -> float:
    """Mean NLL of ``heldout[1:]`` (the tokens the models predict) under add-one-smoothed
    unigram frequencies of ``train``."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    return float(-logp[heldout[1:]].mean())


def train(trainees: list[Trainee], train_stream: torch.Tensor, val_stream: torch.Tensor,
          cfg: TrainConfig, teacher: torch.nn.Module | None = None, generated: torch.Tensor | None = None,
          val_rows: torch.Tensor | None = None) -> dict:
    """Train every trainee on the same batches; return what the report needs about the run. With
    a ``teacher``, each loss mixes in KL(teacher || trainee) with weight ``cfg.distill_alpha``,
    and ``generated`` (the teacher's own sequences) supplies part of each batch."""
    device = train_stream.device
    tokens_per_step = cfg.batch_size * cfg.seq_len
    epoch_steps = max(1, math.ceil(cfg.max_epochs * train_stream.numel() / tokens_per_step))
    planned = min(cfg.steps or epoch_steps, epoch_steps)
    warmup = max(1, min(cfg.warmup_steps, planned // 10))
    generator = torch.Generator().manual_seed(cfg.seed)
    deadline = math.inf if cfg.max_minutes is None else time.perf_counter() + 60.0 * cfg.max_minutes
    # Time the steps after a few warm-up ones (allocator, kernel autotuning, compilation); re-plan
    # at powers of two, as the estimate of the step time sharpens.
    measure_from = (5, 0.0)
    bar = _progress(planned)
    step, log_start, validation_s, started = 0, (0, time.perf_counter()), 0.0, time.perf_counter()
    for trainee in trainees:
        trainee.model.train()
        trainee.loss_sum = torch.zeros((), device=device)
    while step < planned and time.perf_counter() < deadline:
        batch = mixed_batch(train_stream, generated, cfg.distill_generate_fraction, cfg.batch_size, cfg.seq_len,
                            generator)
        x, y = batch[:, :-1], batch[:, 1:]
        if teacher is not None:
            with torch.no_grad(), autocast(device):
                teacher_logp = F.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), -1).flatten(0, 1)
        for t in trainees:
            for group in t.optimizer.param_groups:
                group["lr"] = lr_at(step, t.peak_lr, warmup, planned)
            with autocast(device):
                logits = t.forward(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            if teacher is not None:
                logp = F.log_softmax(logits.float().flatten(0, 1), -1)
                kl = F.kl_div(logp, teacher_logp, log_target=True, reduction="batchmean")
                loss = cfg.distill_alpha * kl + (1.0 - cfg.distill_alpha) * loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(t.model.parameters(), 1.0)
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            t.loss_sum += loss.detach()
        step += 1
        if step == measure_from[0]:
            _sync(device)
            measure_from = (step, time.perf_counter())
        if step >= 16 and step & (step - 1) == 0 and math.isfinite(deadline):
            _sync(device)
            now = time.perf_counter()
            seconds_per_step = (now - measure_from[1]) / (step - measure_from[0])
            fits = step + int(0.98 * (deadline - now) / seconds_per_step)
            planned = max(step, min(cfg.steps or fits, epoch_steps, fits))
            if bar is not None:
                bar.total = planned
        if step % cfg.log_every == 0 or step == planned:
            _log(trainees, step, planned, log_start, tokens_per_step, bar)
            log_start = (step, time.perf_counter())
        if step % cfg.eval_every == 0 or step == planned:
            seconds = _validate(trainees, step, val_stream, cfg, teacher, val_rows)
            validation_s += seconds
            log_start = (log_start[0], log_start[1] + seconds)  # tokens/s counts training time only
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # Stopped by the deadline between two logs or validations: record the last state too.
    if step and (not trainees[0].loss_curve or trainees[0].loss_curve[-1][0] != step):
        _log(trainees, step, planned, log_start, tokens_per_step, None)
    train_s = time.perf_counter() - started - validation_s
    if not trainees[0].val_curve or trainees[0].val_curve[-1][0] != step:
        _validate(trainees, step, val_stream, cfg, teacher, val_rows)
    for t in trainees:
        t.model.eval()
        if t.best_state is not None and t.best_step != step:
            t.model.load_state_dict(t.best_state)
    return {"steps": step, "planned_steps": planned, "warmup_steps": warmup, "tokens_seen": step * tokens_per_step,
            "epochs": step * tokens_per_step / train_stream.numel(),
            "train_tokens_per_s": step * tokens_per_step / max(1e-9, train_s)}


def _validate(trainees: list[Trainee], step: int, val_stream: torch.Tensor, cfg: TrainConfig,
              teacher: torch.nn.Module | None = None, val_rows: torch.Tensor | None = None) -> float:
    """Record each trainee's validation loss (its KL from the ``teacher`` when there is one),
    keeping a copy of its best weights; return the seconds taken."""
    started = time.perf_counter()
    for t in trainees:
        t.model.eval()
        if teacher is None:
            loss = evaluate([t.model], val_stream, cfg.seq_len, cfg.batch_size)["nll"][0]
        elif val_rows is not None:
            loss = kl_on_rows(teacher, t.model, val_rows, cfg.batch_size)
        else:
            loss = evaluate([teacher, t.model], val_stream, cfg.seq_len, cfg.batch_size)["kl"][0]
        t.model.train()
        t.val_curve.append((step, loss))
        if loss < t.best_val_loss:
            t.best_val_loss, t.best_step = loss, step
            t.best_state = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    return time.perf_counter() - started


def _log(trainees: list[Trainee], step: int, planned: int, log_start: tuple[int, float],
         tokens_per_step: int, bar) -> None:
    steps = step - log_start[0]
    losses = []
    for t in trainees:
        loss = float(t.loss_sum) / max(1, steps)  # float() waits for the device, so the timing is real
        t.loss_sum.zero_()
        t.loss_curve.append((step, loss))
        losses.append(f"{t.name} {loss:.3f}")
    tokens_per_s = steps * tokens_per_step / max(1e-9, time.perf_counter() - log_start[1])
    line = f"{', '.join(losses)}, lr x{trainees[0].optimizer.param_groups[0]['lr'] / trainees[0].peak_lr:.2f}, " \
           f"{tokens_per_s:,.0f} tokens/s"
    if bar is not None:
        bar.set_postfix_str(line, refresh=False)
    else:
        print(f"step {step}/{planned}: {line}", flush=True)


def _progress(total: int, desc: str = "train"):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # Updates are rare so that a captured log's tail still shows the lines that matter.
    return tqdm(total=total, desc=desc, mininterval=10.0, file=sys.stderr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_model(model: torch.nn.Module, tokenizer, directory: Path) -> dict[str, int]:
    """Save ``model`` in bf16 as a standard checkpoint with the tokenizer; return file sizes."""
    from transformers import GenerationConfig

    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(directory)
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir())}


def load_teacher(path: str, scratch: Path) -> torch.nn.Module:
    """The target to distil from, in float32 for transformers: an AWQ checkpoint is dequantized
    (into ``scratch``) exactly as sluice's CPU path computes its weights."""
    from transformers import AutoModelForCausalLM

    from models.dense_checkpoint import dequantized_state_dict, save_dense_checkpoint

    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") == "awq":
        path = str(save_dense_checkpoint(dequantized_state_dict(path), path, scratch))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def main(argv: list[str] | None = None) -> dict:
    """Run everything; return the report (also written to ``OUT/train_report.json``)."""
    import transformers

    started = time.perf_counter()
    cfg = parse_args(argv)
    print(f"config: {json.dumps(asdict(cfg))}", flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside bf16 autocast
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    corpus = load_corpus(max_files=cfg.max_files)
    (out / "heldout_files.txt").write_text("".join(f"{p}\n" for p in corpus.paths["heldout"]))
    (out / "validation_files.txt").write_text("".join(f"{p}\n" for p in corpus.paths["validation"]))
    timings["corpus_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    teacher = None
    if cfg.distill_from is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.distill_from)
        teacher = load_teacher(cfg.distill_from, out / "teacher-dense").to(device).eval()
    else:
        tokenizer = train_tokenizer(corpus.texts["train"], cfg.vocab_size)
    tokenizer.model_max_length = 2048
    timings["tokenizer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    streams = {s: token_stream(tokenizer, corpus.texts[s]) for s in SPLITS}
    timings["tokenize_s"] = time.perf_counter() - t0
    vocab_size = len(tokenizer)
    print(f"corpus: {', '.join(f'{s} {len(corpus.paths[s])} files {len(streams[s]):,} tokens' for s in SPLITS)}; "
          f"tokenizer {timings['tokenizer_s']:.1f}s, tokenizing {timings['tokenize_s']:.1f}s", flush=True)

    on_device = {s: torch.from_numpy(streams[s].astype(np.int64)).to(device) for s in SPLITS}
    shapes = TINY_SHAPES if cfg.tiny else SHAPES
    trainees = []
    for name in cfg.models:
        if cfg.init_from is not None:
            model = transformers.AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)
            shapes = {**shapes, name: shape_of(model.config, shapes[name].peak_lr)}
        else:
            model = build_model(shapes[name], vocab_size, cfg.seed, tokenizer.eos_token_id, tokenizer.pad_token_id)
        model.to(device)
        optimizer = make_optimizer(model, cfg.weight_decay, fused=device.type == "cuda")
        forward = torch.compile(model) if cfg.compile else model
        trainees.append(Trainee(name, model, optimizer, cfg.lr or shapes[name].peak_lr, forward=forward))

    generated = val_rows = None
    if cfg.distill_generate:
        t0 = time.perf_counter()
        starts = None
        if cfg.distill_prompts == "file-starts":
            starts = file_starts(on_device["train"], tokenizer.eos_token_id, cfg.seq_len + 1)
        generated = generate_from_teacher(teacher, on_device["train"], cfg.distill_generate, min(64, cfg.seq_len // 2),
                                          cfg.seq_len, 1024, torch.Generator().manual_seed(cfg.seed + 1), starts)
        val_starts = None
        if cfg.distill_prompts == "file-starts":
            val_starts = file_starts(on_device["validation"], tokenizer.eos_token_id, cfg.seq_len + 1)
        val_rows = generate_from_teacher(teacher, on_device["validation"], 4 * cfg.batch_size,
                                         min(64, cfg.seq_len // 2), cfg.seq_len, 1024,
                                         torch.Generator().manual_seed(cfg.seed + 3), val_starts)
        timings["generate_s"] = time.perf_counter() - t0
        print(f"generated {generated.numel():,} tokens with the target in {timings['generate_s']:.0f}s", flush=True)

    t0 = time.perf_counter()
    run = train(trainees, on_device["train"], on_device["validation"], cfg, teacher, generated, val_rows)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    evaluated = [t.model for t in trainees] if teacher is None else [teacher, *(t.model for t in trainees)]
    heldout = evaluate(evaluated, on_device["heldout"], cfg.seq_len, cfg.batch_size)
    on_target_text = None
    if teacher is not None:  # the teacher's figures are the target's, not this run's
        heldout["nll"] = heldout["nll"][1:]
        # What speculative decoding meets: the target's own greedy continuations of held-out prompts.
        prompt_len = min(64, cfg.seq_len // 2)
        rows = generate_from_teacher(teacher, on_device["heldout"], 64, prompt_len, cfg.seq_len, 64,
                                     torch.Generator().manual_seed(cfg.seed + 2))
        on_target_text = greedy_agreement(teacher, trainees[0].model, rows, prompt_len - 1)
    unigram = unigram_nll(streams["train"], streams["heldout"], vocab_size)
    timings["eval_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models_report = {}
    for t, nll in zip(trainees, heldout["nll"]):
        models_report[t.name] = {
            "params": sum(p.numel() for p in t.model.parameters()),
            "shape": asdict(shapes[t.name]),
            "final_train_loss": t.loss_curve[-1][1] if t.loss_curve else None,
            "loss_curve": t.loss_curve,
            "val_curve": t.val_curve,
            "saved_step": t.best_step,
            "best_val_loss": t.best_val_loss,
            "heldout_nll": nll,
            "heldout_ppl": math.exp(nll),
            "files": save_model(t.model, tokenizer, out / t.name),
        }
    timings["save_s"] = time.perf_counter() - t0

    report = {
        "command": " ".join([sys.executable, *sys.argv]) if argv is None else " ".join(["train.py", *argv]),
        "config": asdict(cfg),
        "seed": cfg.seed,
        "python_version": platform.python_version(),
        "corpus": {
            "root": corpus.root,
            "files": {s: len(corpus.paths[s]) for s in SPLITS},
            "tokens": {s: int(len(streams[s])) for s in SPLITS},
            "undecodable_files": corpus.num_undecodable,
        },
        "vocab_size": vocab_size,
        "models": models_report,
        **run,
        "heldout_tokens_predicted": heldout["tokens"],
        "unigram_heldout_nll": unigram,
        "unigram_heldout_ppl": math.exp(unigram),
        "draft_target_greedy_agreement": heldout["agreement"] if len(evaluated) == 2 else None,
        "draft_target_greedy_agreement_on_target_text": on_target_text,
        "heldout_kl_from_target": heldout["kl"][0] if teacher is not None else None,
        "distilled_from": cfg.distill_from,
        "timings": timings,
        "wall_time_s": time.perf_counter() - started,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    summary = {n: round(m["heldout_ppl"], 2) for n, m in models_report.items()}
    print(f"held-out perplexity {summary} (unigram {math.exp(unigram):.1f}), agreement "
          f"{report['draft_target_greedy_agreement']} (on the target's own text {on_target_text}), "
          f"{run['steps']} steps, {run['epochs']:.1f} epochs, "
          f"{run['train_tokens_per_s']:,.0f} tokens/s, "
          f"wall {report['wall_time_s']:.0f}s", flush=True)
    return report


if __name__ == "__main__":
    main()
