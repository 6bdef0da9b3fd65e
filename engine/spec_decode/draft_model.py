"""The draft-model proposer: a small model with the target's vocabulary drafts k tokens per
request, one batched forward per draft position, with a KV cache of its own indexed by the
target's block tables (same number of blocks, same block size; no block manager of its own).

::

    request tokens:   t0 ........................ t(N-1)     N = prompt + output
    draft KV valid:   [0, v)                                  computed from the request's tokens
    catch-up:                    t(v) ... t(N-1)              one batched forward; logits at N-1 -> d0
    decode:                                  d0@N  d1@N+1     k - 1 forwards -> d1 .. d(k-1)

The drafts' own KV (positions N-1 .. N+k-2) lands in lookahead slots the scheduler handed out
(``Scheduler.allocate_lookahead``). After the verify step the draft trusts its KV up to the
drafts the request's tokens repeat, so it usually catches up on one or two tokens. It starts
from position 0 for a request it has not seen, or whose blocks changed (preemption): prefix-cache
blocks hold the target's KV, not necessarily the draft's. The draft's KV is a cache of guesses;
the output never depends on it, only the acceptance rate does.

Greedy requests get the argmax of the draft's processed logits; sampled requests a draw from
the draft's distribution (their sampling parameters applied to the draft's logits) with noise
of its own, and that distribution goes with the drafts for the rejection sampler's min(1, p/q).
A seeded request's draft noise depends on its seed and output index alone, so it stays
reproducible whatever the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from engine.attention.backend import AttentionBackend
from engine.config import EngineArgs
from engine.cuda_graph import StepGraphs, step_logits
from engine.input_buffers import InputBuffers
from engine.kv_cache import KVCaches, allocate_kv_cache, kv_block_bytes
from engine.model_config import ModelConfig
from engine.model_loader import load_model
from engine.sampler import SamplingRow, draw_seed, needs_processing, process_logits, sampling_probs
from engine.sampling_params import SamplingParams
from engine.spec_decode.cpu_draft import LeanDraftForward
from engine.spec_decode.proposer import DraftRequest, Proposal, Proposer
from scheduler.outputs import ScheduledRequest

_GREEDY = SamplingParams(temperature=0.0, max_tokens=None)
# Mixed into a seeded request's seed: the draft's draws must not reuse the verifier's noise.
_DRAFT_NOISE_STREAM = 0x5D2A_F7C1_9E3B_4A68


@dataclass(slots=True)
class _DraftState:
    block_table: Sequence[int]  # the scheduler's live table: another list means other blocks
    num_preemptions: int
    num_valid: int  # leading positions whose draft KV was computed from the request's tokens
    fed_drafts: list[int]  # drafts whose KV was written at positions num_valid, num_valid + 1, ...


def load_draft_config(args: EngineArgs, target: ModelConfig) -> ModelConfig:
    """The draft model's config on the target's device and dtype, with the target's context;
    ``ValueError`` naming ``speculative_model`` when the pair cannot work together."""
    assert args.speculative_model is not None
    try:
        config = ModelConfig.from_pretrained(args.speculative_model, dtype=args.dtype,
                                             max_model_len=target.max_model_len, device=target.device)
    except (ValueError, OSError) as exc:
        raise ValueError(f"speculative_model {args.speculative_model!r}: {exc}") from exc
    if config.vocab_size != target.vocab_size:
        raise ValueError(
            f"speculative_model {args.speculative_model!r} has a vocabulary of {config.vocab_size} tokens, the "
            f"target {target.vocab_size}: a draft must share the target's tokenizer")
    return config


class DraftModelProposer(Proposer):
    def __init__(self, config: ModelConfig, args: EngineArgs, backend: AttentionBackend,
                 eos_token_ids: Sequence[int] = (), graph_batch_size: int | None = None) -> None:
        """``graph_batch_size``: capture CUDA graphs for the draft's decode forwards up to this
        batch size (None: always eager, as on CPU)."""
        self.config = config
        self.args = args
        self.device = config.device
        self.backend = backend
        self.block_size = args.block_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.graph_batch_size = graph_batch_size
        self.model: torch.nn.Module | None = None
        self.kv_caches: KVCaches = []
        self.graphs: StepGraphs | None = None
        self.lean: LeanDraftForward | None = None  # the CPU's drafting steps (engine/spec_decode/cpu_draft.py)
        max_blocks = -(-config.max_model_len // self.block_size)
        self.buffers = InputBuffers(max(args.max_num_batched_tokens, args.max_num_seqs), args.max_num_seqs,
                                    max_blocks, self.block_size, self.device)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(args.seed ^ _DRAFT_NOISE_STREAM)
        self._states: dict[str, _DraftState] = {}

    def load_model(self) -> None:
        self.model = load_model(self.config, self.args.load_format, self.args.cpu_onednn_linear)

    def kv_block_bytes(self) -> int:
        return kv_block_bytes(self.config, self.block_size)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the draft's cache with the target's ``num_blocks``."""
        assert self.model is not None, "load_model() first"
        self.kv_caches = allocate_kv_cache(self.config, num_blocks, self.block_size)
        self.model.bind_kv_cache(self.kv_caches)
        if self.device.type == "cpu" and self.config.dtype == torch.float32:
            self.lean = LeanDraftForward(self.model, self.block_size)
        if self.graph_batch_size is not None:
            self.graphs = StepGraphs(self.model, self.buffers, self.backend, self.graph_batch_size)
            self.graphs.capture()

    def num_lookahead_slots(self, num_draft_tokens: int) -> int:
        # The last sampled token's position and the first k - 1 drafts'.
        return num_draft_tokens

    def finish_requests(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._states.pop(request_id, None)

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest]) -> Proposal:
        assert self.model is not None and self.kv_caches, "load_model() and initialize_kv_cache() first"
        drafts: list[list[int]] = [[] for _ in requests]
        active = [i for i, r in enumerate(requests) if r.num_draft_tokens > 0]
        if not active:
            return Proposal(drafts)
        k = max(requests[i].num_draft_tokens for i in active)
        sampled = any(not _params(requests[i]).is_greedy for i in active)
        probs = torch.zeros((len(requests), k, self.config.vocab_size), device=self.device) if sampled else None
        threshold = self.args.draft_confidence_threshold
        logits = self._catch_up([requests[i] for i in active])
        for j in range(k):
            if j:
                active = [i for i in active if requests[i].num_draft_tokens > j]
                if not active:
                    break
                logits = self._decode([requests[i] for i in active], [drafts[i][-1] for i in active], j)
            tokens, step_probs, confidence = self._draw(logits, [requests[i] for i in active],
                                                        [drafts[i] for i in active], threshold > 0)
            for row, (i, token) in enumerate(zip(active, tokens, strict=True)):
                drafts[i].append(token)
                if probs is not None and step_probs is not None:
                    probs[i, j] = step_probs[row]
            if confidence is not None:  # a draft below the threshold is a request's last
                active = [i for i, c in zip(active, confidence, strict=True) if c >= threshold]
        for r, r_drafts in zip(requests, drafts, strict=True):
            if r_drafts:
                num_tokens = len(r.prompt_token_ids) + len(r.output_token_ids)
                self._states[r.request_id] = _DraftState(r.block_table, r.num_preemptions, num_tokens,
                                                         r_drafts[:-1])
        return Proposal(drafts, probs)

    # ------------------------------------------------------------------ forwards
    def _catch_up(self, requests: list[DraftRequest]) -> torch.Tensor:
        """Compute the draft KV each request lacks, up to its last token; the logits there
        ``[len(requests), vocab]``. One forward per token budget's worth (usually one)."""
        budget, max_reqs = self.buffers.max_tokens, self.buffers.max_reqs
        logits: list[torch.Tensor] = []
        batch: list[ScheduledRequest] = []
        num_batched = 0
        for r in requests:
            num_tokens = len(r.prompt_token_ids) + len(r.output_token_ids)
            position = self._first_stale_position(r, num_tokens)
            while position < num_tokens:
                if num_batched == budget or len(batch) == max_reqs:
                    # A copy: the next forward may replay the graph whose output this is.
                    logits.extend(x.clone() for x in self._forward(batch))
                    batch, num_batched = [], 0
                n = min(num_tokens - position, budget - num_batched)
                end = position + n
                batch.append(_scheduled(r, _token_slice(r, position, end), position, end == num_tokens))
                position, num_batched = end, num_batched + n
        logits.extend(self._forward(batch))
        return torch.cat(logits)

    def _decode(self, requests: list[DraftRequest], last_drafts: list[int], j: int) -> torch.Tensor:
        """Feed each request's draft j - 1 at its position; the logits after it."""
        return torch.cat(self._forward([
            _scheduled(r, [d], len(r.prompt_token_ids) + len(r.output_token_ids) + j - 1, True)
            for r, d in zip(requests, last_drafts, strict=True)
        ]))

    def _forward(self, batch: list[ScheduledRequest]) -> list[torch.Tensor]:
        if not batch:
            return []
        if self.lean is not None and self.lean.supports(batch):
            return [self.lean(batch)]
        logits = step_logits(self.model, self.buffers, self.backend, self.graphs, batch)
        return [] if logits is None else [logits]

    def _first_stale_position(self, r: DraftRequest, num_tokens: int) -> int:
        """The first position whose draft KV must be computed: past the tokens and the fed drafts
        the request's tokens confirm, and never past its last token (whose logits are needed)."""
        state = self._states.get(r.request_id)
        if state is None or state.block_table is not r.block_table or state.num_preemptions != r.num_preemptions:
            return 0
        valid = state.num_valid
        for draft in state.fed_drafts:
            if valid >= num_tokens or _token_at(r, valid) != draft:
                break
            valid += 1
        return min(valid, num_tokens - 1)

    # ------------------------------------------------------------------ drawing drafts
    def _draw(self, logits: torch.Tensor, requests: list[DraftRequest], drafts: list[list[int]],
              confidence: bool = False) -> tuple[list[int], torch.Tensor | None, list[float] | None]:
        """Each request's next draft from ``logits`` (its row); the distributions drawn from
        when any request samples (None: all greedy); with ``confidence``, the probability the
        draft's distribution gives its most likely token, per row."""
        rows = [SamplingRow(_params(r), r.prompt_token_ids, [*r.output_token_ids, *d])
                for r, d in zip(requests, drafts, strict=True)]
        params = [row.params for row in rows]
        if all(p.is_greedy for p in params):
            # Where no row's logits change, the raw logits' argmax (no float32 copy: widening keeps it).
            if any(map(needs_processing, rows)):
                logits = process_logits(logits, rows, self.eos_token_ids)
            if not confidence:
                return logits.argmax(dim=-1).tolist(), None, None
            top, tokens = torch.softmax(logits.float(), dim=-1).max(dim=-1)
            return tokens.tolist(), None, top.tolist()
        processed = process_logits(logits, rows, self.eos_token_ids)
        probs = sampling_probs(processed, params)
        tokens = (probs / self._noise(probs.shape[-1], rows)).argmax(dim=-1)
        return tokens.tolist(), probs, probs.max(dim=-1).values.tolist() if confidence else None

    def _noise(self, vocab_size: int, rows: list[SamplingRow]) -> torch.Tensor:
        """Exp(1) noise per row: argmax(probs / noise) draws from probs (greedy rows' one-hot
        probs ignore it)."""
        noise = torch.empty((len(rows), vocab_size), device=self.device).exponential_(generator=self._generator)
        for i, row in enumerate(rows):
            if row.params.seed is not None and not row.params.is_greedy:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(draw_seed(row.params.seed ^ _DRAFT_NOISE_STREAM, len(row.output_token_ids)))
                noise[i].exponential_(generator=generator)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _params(r: DraftRequest) -> SamplingParams:
    return r.sampling_params if r.sampling_params is not None else _GREEDY


def _token_at(r: DraftRequest, position: int) -> int:
    n = len(r.prompt_token_ids)
    return r.prompt_token_ids[position] if position < n else r.output_token_ids[position - n]


def _token_slice(r: DraftRequest, start: int, end: int) -> list[int]:
    prompt, output = r.prompt_token_ids, r.output_token_ids
    n = len(prompt)
    if end <= n:
        return list(prompt[start:end])
    if start >= n:
        return list(output[start - n:end - n])
    return [*prompt[start:], *output[:end - n]]


def _scheduled(r: DraftRequest, token_ids: list[int], start: int, sample: bool) -> ScheduledRequest:
    """One draft forward's share of ``r``, in the runner's input format (by reference, no copies)."""
    return ScheduledRequest(r.request_id, token_ids, start, r.block_table, sample, r.sampling_params,
                            r.prompt_token_ids, r.output_token_ids)
