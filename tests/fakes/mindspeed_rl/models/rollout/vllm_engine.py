"""Fake ``mindspeed_rl/models/rollout/vllm_engine.py::VLLMInferEngine`` at 05a90d77 (rewritten, reduced).

Kept from upstream: ``generate_sequences(idx_list, **kwargs)`` initialises the KV cache, decodes every prompt to
text with ``skip_special_tokens=True`` (since cb82020) and lets the engine tokenize it again, generates under
``update_sampling_params(**kwargs)``, post-processes (token ids right-padded with the pad token; log-probs of the
sampled tokens, padded with the pad token id as upstream does) and frees the KV cache. ``sync_model_weights``
rebinds each vLLM parameter's data to the given buffer (no copy), as ``load_megatron_weights`` does;
``offload_model_weights`` rebinds them to CPU buffers. The ``LLM`` is passed in (``llm=``, a simulator of vLLM's
offline engine), with the model, HF config and tokenizer.
"""

from contextlib import contextmanager

import torch
from torch.nn.utils.rnn import pad_sequence


class VLLMInferEngine:
    def __init__(
        self, tokenizer_name_or_path=None, sampling_config=None, llm=None, hf_config=None, tokenizer=None, **kwargs
    ):
        self.sampling_config = sampling_config or {}
        self.llm = llm
        self.sampling_params = llm.default_sampling_params(self.sampling_config)
        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.tokenizer.pad_token_id
        self.model = llm.model
        self.cpu_model = {name: torch.empty_like(p) for name, p in self.model.named_parameters()}
        self.cache_inits = 0

    def init_cache_engine(self):
        self.llm.allocate_kv_cache()
        self.cache_inits += 1

    def free_cache_engine(self):
        self.llm.free_kv_cache()

    def offload_model_weights(self):
        for name, param in self.model.named_parameters():
            param.data = self.cpu_model[name]

    def sync_model_weights(self, params, load_format="megatron"):
        for name, param in self.model.named_parameters():
            if name in params:
                param.data = params[name]

    def generate_sequences(self, idx_list, **kwargs):
        self.init_cache_engine()
        prompts = [self.tokenizer.tokenizer.decode(p, skip_special_tokens=True) for p in idx_list]
        with self.update_sampling_params(**kwargs):
            response = self.llm.generate(prompts=prompts, sampling_params=self.sampling_params, use_tqdm=False)
            outs = self._post_process_outputs(response)
        self.free_cache_engine()
        return outs

    def _post_process_outputs(self, request_outputs):
        token_ids, logprobs = [], []
        for request_output in request_outputs:
            for output in request_output.outputs:
                token_ids.append(torch.tensor(output.token_ids))
                if output.logprobs is None:
                    continue
                logprobs.append(
                    torch.tensor([d[t].logprob for d, t in zip(output.logprobs, output.token_ids, strict=True)])
                )
        token_ids = pad_sequence(token_ids, batch_first=True, padding_value=self.pad_token_id)
        if logprobs:
            logprobs = pad_sequence(logprobs, batch_first=True, padding_value=self.pad_token_id)
        return token_ids, logprobs

    @contextmanager
    def update_sampling_params(self, **kwargs):
        old = {}
        for key, value in kwargs.items():
            if hasattr(self.sampling_params, key):
                old[key] = getattr(self.sampling_params, key)
                setattr(self.sampling_params, key, value)
        yield
        for key, value in old.items():
            setattr(self.sampling_params, key, value)
