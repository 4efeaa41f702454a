"""Adapters that plug forkdec into other engines.

- `forkdec.integrations.transformers`: `enable(model)` switches a loaded Hugging
  Face Llama-family model's attention to forkdec's ops.
- `forkdec.integrations.transformers_model`: the model/tokenizer adapters behind
  `forkdec.Engine.from_transformers` (the HF weights are used in place).
- `forkdec.integrations.transformers_cache`: `forkdec_cache(model, "kivi-4")`,
  forkdec's KIVI and XQuant cache kinds as transformers `Cache` classes for
  `model.generate(past_key_values=...)`.
- `forkdec.integrations.layouts`: vLLM block tables and SGLang `req_to_token`
  rows as forkdec page tables, by index arithmetic only.
- `forkdec.integrations.vllm_backend`: forkdec as vLLM's out-of-tree (CUSTOM)
  attention backend; needs vllm.

transformers and vllm are imported only by the modules that need them.
"""
