"""qattn inside other libraries' model code.

- :mod:`qattn.integrations.transformers`: ``register()`` adds an attention
  implementation, then ``AutoModel.from_pretrained(..., attn_implementation="qattn")``.
- :mod:`qattn.integrations.diffusers`: ``register()`` adds an attention backend, then
  ``model.set_attention_backend("qattn")`` or ``with attention_backend("qattn"):``.
- Anything else that calls ``torch.nn.functional.scaled_dot_product_attention``:
  :func:`qattn.patch_sdpa`.

The submodules import their library only when imported themselves; this package
imports neither.
"""

__all__ = ["transformers", "diffusers"]
