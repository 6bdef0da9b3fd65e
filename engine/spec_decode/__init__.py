"""Speculative decoding: proposers guess the next k tokens of running requests, the target model
computes all k + 1 positions in one verify step, and the rejection sampler keeps the drafts the
target distribution accepts, so the output is distributed exactly as without speculation."""

from engine.spec_decode.draft_model import DraftModelProposer, load_draft_config
from engine.spec_decode.ngram_proposer import NgramProposer, ngram_lookup
from engine.spec_decode.policy import SpeculationPolicy
from engine.spec_decode.proposer import DraftRequest, Proposal, Proposer
from engine.spec_decode.rejection_sampler import (
    RejectionSampler,
    VerifyOutput,
    rejection_sample,
    verification_rows,
)

__all__ = [
    "DraftModelProposer",
    "DraftRequest",
    "NgramProposer",
    "Proposal",
    "Proposer",
    "RejectionSampler",
    "SpeculationPolicy",
    "VerifyOutput",
    "load_draft_config",
    "ngram_lookup",
    "rejection_sample",
    "verification_rows",
]
