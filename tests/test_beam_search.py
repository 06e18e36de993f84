"""Beam search (vLLM's `use_beam_search`, `LLM.beam_search`) against HF transformers' and by hand."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch
from openai import OpenAI

from ember.engine.beam_search import BeamSearch, BeamSearchParams
from ember.engine.engine import LLM
from ember.engine.sampling_params import InvalidParameter, SamplingParams
from ember.server.launch import ServerProcess
from tests.test_server import MODEL, TOOLS, assert_idle
from tests.test_tiny_parity import random_prompts


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_beams_match_hf_generate_with_num_beams(tiny_models: dict, family: str) -> None:
    """Without a stop token (HF's generation has no EOS, Ember ignores it), both keep the exact top beams: the
    same sequences in the same order, with the same summed logprobs (length_penalty 0: no length term)."""
    from transformers import GenerationConfig

    path, hf_model = tiny_models[family]
    llm = LLM(str(path), num_blocks=256, block_size=8, dtype="float32", device="cpu")
    prompts = random_prompts()[:3]
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True, length_penalty=0.0)
    outputs = llm.beam_search(prompts, params)
    config = GenerationConfig(
        num_beams=3,
        num_return_sequences=3,
        max_new_tokens=6,
        do_sample=False,
        length_penalty=0.0,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    hf_model.generation_config.eos_token_id = None  # (the config's EOS would override the generation config's None)
    for prompt, out in zip(prompts, outputs, strict=True):
        with torch.inference_mode():
            hf = hf_model.generate(torch.tensor([prompt]), generation_config=config)
        expected = [seq[len(prompt) :].tolist() for seq in hf.sequences]
        assert [o.token_ids for o in out.outputs] == expected
        scores = [o.cumulative_logprob for o in out.outputs]
        assert scores == pytest.approx(hf.sequences_scores.tolist(), abs=1e-4)
        assert all(o.finish_reason == "length" for o in out.outputs)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    one_beam = llm.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in one_beam] == [g.outputs[0].token_ids for g in greedy]
    assert llm.engine.kv_cache.pool.num_free_blocks == 256  # every step's requests gave their blocks back


class Tokens:
    """A stand-in tokenizer: token i is the letter chr(ord('a') + i), the stop token 9 is '$'."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("$" if i == 9 else chr(ord("a") + i) for i in ids if not (skip_special_tokens and i == 9))


def test_stopped_beams_are_set_aside_and_ranked_by_length_penalty() -> None:
    """Worked by hand: a prompt of 2 tokens, beam width 2, stop token 9. Step 1: 'a' (-0.1), 'b' (-0.5), the stop
    token (-2.0). Step 2 extends 'a' to 'aa' (-1.1) and 'a$' (-0.3) and 'b' to 'bb' (-0.7), 'bc' (-0.8)."""
    params = BeamSearchParams(2, max_tokens=2, include_stop_str_in_output=True, skip_special_tokens=False)
    search = BeamSearch([5, 6], params, eos_token_ids=[9], max_model_len=100)
    assert search.sequences() == [[5, 6]]
    search.advance([[(0, -0.1), (1, -0.5), (9, -2.0), (2, -2.5)]])
    assert search.sequences() == [[5, 6, 0], [5, 6, 1]] and len(search.stopped) == 1  # '$' set aside
    search.advance([[(0, -1.0), (9, -0.2)], [(1, -0.2), (2, -0.3)]])
    assert search.done
    out = search.output("r", None, Tokens())
    # scores: 'a$' -0.3/3 = -0.1 (the stop token not counted), 'bb' -0.7/4, 'bc' -0.8/4, 'aa' -1.1/4, '$' -2/2
    assert [(o.text, o.finish_reason) for o in out.outputs] == [("a$", "stop"), ("bb", "length")]
    assert [o.cumulative_logprob for o in out.outputs] == pytest.approx([-0.3, -0.7])
    assert out.outputs[0].stop_reason == 9 and out.outputs[0].token_ids == [0, 9]
    short = BeamSearch([5, 6], BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=0.0), [9], 100)
    short.advance([[(0, -0.1), (1, -0.5), (9, -0.2)]])
    short.advance([[(0, -1.0), (9, -0.2)], [(1, -0.2), (2, -0.3)]])
    # no length term: the lone stop token (-0.2) beats 'a$' (-0.3); the stop token's text is left out
    assert [(o.text, o.token_ids) for o in short.output("r", None, Tokens()).outputs] == [("", [9]), ("a", [0, 9])]


def test_a_beam_search_ends_at_the_context() -> None:
    search = BeamSearch([1] * 98, BeamSearchParams(beam_width=2, max_tokens=50), eos_token_ids=[9], max_model_len=100)
    search.advance([[(0, -0.1), (1, -0.2)]])
    search.advance([[(0, -0.1)], [(1, -0.2)]])
    assert search.done and len(search.live[0].token_ids) == 2


@pytest.mark.parametrize(
    ("kwargs", "param"), [({"beam_width": 0}, "n"), ({"beam_width": 11}, "n"), ({"max_tokens": 0}, "max_tokens")]
)
def test_bad_beam_search_params_name_their_field(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kwargs})
    assert info.value.param == param


def test_the_server_beam_searches_as_the_offline_engine(server: ServerProcess, smollm: LLM) -> None:
    """vLLM's use_beam_search on completions and chat: `n` beams come back best first, as `LLM.beam_search` finds
    them on the same model; the fields beam search cannot honor are a 400 naming them; no KV block stays taken."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    prompt = "The best thing about Paris is"
    reply = client.completions.create(
        model=MODEL, prompt=prompt, n=3, max_tokens=8, extra_body={"use_beam_search": True, "length_penalty": 0.5}
    )
    offline = smollm.beam_search(prompt, BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=0.5))[0]
    assert [c.text for c in reply.choices] == [o.text for o in offline.outputs]
    assert [c.index for c in reply.choices] == [0, 1, 2] and len({c.text for c in reply.choices}) == 3

    messages = [{"role": "user", "content": "Name a fruit."}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, n=2, max_tokens=12, extra_body={"use_beam_search": True}
    )
    prompt_ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    offline_chat = smollm.beam_search([prompt_ids], BeamSearchParams(beam_width=2, max_tokens=12))[0]
    assert [c.message.content for c in chat.choices] == [o.text for o in offline_chat.outputs]
    assert [c.finish_reason for c in chat.choices] == [o.finish_reason for o in offline_chat.outputs]

    beam = {"use_beam_search": True, "n": 2, "max_tokens": 4}
    for path, body, param in [
        ("/v1/completions", {"prompt": "Hi", **beam, "stream": True}, "stream"),
        ("/v1/completions", {"prompt": "Hi", **beam, "n": 11}, "n"),
        ("/v1/completions", {"prompt": "Hi", **beam, "logprobs": 2}, "logprobs"),
        ("/v1/completions", {"prompt": "Hi", **beam, "stop": ["."]}, "stop"),
        ("/v1/chat/completions", {"messages": messages, **beam, "tools": TOOLS}, "tools"),
    ]:
        answer = httpx.post(f"{server.url}{path}", json=body, timeout=30)
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["param"] == param and "beam" in error["message"], error
    assert_idle(server)
