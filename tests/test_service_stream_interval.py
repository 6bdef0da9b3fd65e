"""``sluice serve --stream-interval N --async-scheduling``: a real server whose streams gather N
tokens a message (the first and the last at once), scheduling asynchronously; the tokens equal
the offline engine's."""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from service.client import SluiceClient
from tests.service_fixtures import NUM_KV_BLOCKS, start_server, wait_until_serving


def test_messages_carry_stream_interval_tokens(service_model, tmp_path, oracle) -> None:
    server = start_server(service_model, tmp_path, "--num-kv-blocks", str(NUM_KV_BLOCKS), "--max-num-seqs", "64",
                          "--stream-interval", "4", "--async-scheduling")
    try:
        wait_until_serving(server)
        prompts = [[5, 6, 7], list(range(2, 30)), [9] * 11]
        expected = [o.outputs[0].token_ids for o in oracle.generate(
            prompts, SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True))]
        with SluiceClient(server.address, timeout=60) as client:
            for prompt, want in zip(prompts, expected):
                sizes, tokens = [], []
                for delta in client.generate(prompt, max_tokens=13, temperature=0.0, ignore_eos=True):
                    if delta.token_ids:
                        sizes.append(len(delta.token_ids))
                        tokens.extend(delta.token_ids)
                assert tokens == want
                assert sizes[0] == 1, sizes  # the first token goes at once
                assert all(n >= 4 for n in sizes[1:-1]), sizes
    finally:
        assert server.stop() == 0
