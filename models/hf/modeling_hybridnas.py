"""HybridnasForCausalLM: HybridLM (the installed hybridnas package's model) as a transformers causal LM.

`forward` without a cache is HybridLM.forward (the parallel forms). Under `generate()` the model carries a
`HybridnasCache` as its past state: HybridLM's own static caches (`init_cache(batch, max_tokens)`, sized by
generate's maximum length) and the next cache position. The prompt goes through `HybridLM.prefill`, and every
new token through `HybridLM.decode_step`, the recurrent form (attention reads its KV cache, Mamba2 and
DeltaNet carry their states).

Loading needs hybridnas installed (`pip install hybridnas`): these files import the model rather than copy it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from models.common import rope_frequencies
from models.hybrid import HybridLM
from search.layout import Layout

from .configuration_hybridnas import HybridnasConfig

# Written against 5.24: generate() hands the past state to forward as `cache` and sizes it in
# _prepare_cache_for_generation.
if Version(transformers.__version__) < Version("5.24"):
    raise ImportError(f"hybridnas models need transformers >= 5.24 (installed: {transformers.__version__})")


class HybridnasCache:
    """HybridLM's per-operator caches for one batch of sequences of up to `max_tokens` real tokens,
    allocated at the first (prefill) call, and the cache position the next token goes to."""

    # What generate() asks of a cache: this one is neither compiled nor cropped (no assisted decoding).
    is_compileable = False
    is_croppable = False

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.caches: list[dict] | None = None
        self.position = 0  # cache position of the next token (meta tokens included)
        self.seen = 0  # real tokens consumed so far

    @property
    def is_linear(self) -> list[bool]:
        return [False]  # generate() then reads get_seq_length to slice inputs it already fed

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


class HybridnasPreTrainedModel(PreTrainedModel):
    config_class = HybridnasConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # recurrent states cannot be rolled back: no assisted generation
    _no_split_modules = ["Block"]

    def _init_weights(self, module) -> None:
        pass  # HybridLM initializes its own weights (and from_pretrained loads every one of them)


class HybridnasForCausalLM(HybridnasPreTrainedModel, GenerationMixin):
    def __init__(self, config: HybridnasConfig):
        super().__init__(config)
        layout = Layout.from_dict(config.layout)
        self.model = HybridLM(layout, config.vocab_size, backend=getattr(config, "backend", "auto"))
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.restore_rope_frequencies()
        return model

    def restore_rope_frequencies(self) -> None:
        """from_pretrained builds the model on the meta device and loads only parameters: the attention
        operators' RoPE frequencies (host tensors, not buffers, so that casts never round them) are made
        again here."""
        for module in self.modules():
            inv_freq = getattr(module, "_inv_freq", None)
            if inv_freq and inv_freq["cpu"].is_meta:
                module._inv_freq = {"cpu": rope_frequencies(module.head_dim, module.rope_base)}

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: HybridnasCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "attention_mask: padded batches are not supported (HybridLM has no padding mask)"
            )
        if cache is None:
            logits = self.model(input_ids)
        else:
            logits = self._run_cached(input_ids, cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _run_cached(self, input_ids: torch.LongTensor, cache: HybridnasCache) -> torch.Tensor:
        """Prefill on the first call (and for several new tokens), decode_step for one new token."""
        batch, n_new = input_ids.shape
        if cache.seen + n_new > cache.max_tokens:
            raise ValueError(f"cache: {cache.seen + n_new} tokens exceed the cache's {cache.max_tokens}")
        if cache.caches is None:
            cache.caches = self.model.init_cache(batch, cache.max_tokens)
        if n_new == 1 and cache.seen > 0:
            pos = torch.tensor(cache.position, dtype=torch.long, device=input_ids.device)
            logits = self.model.decode_step(input_ids[:, 0], cache.caches, pos).unsqueeze(1)
            cache.position += 1
        else:
            logits = self.model.prefill(input_ids, cache.caches, start=cache.position)
            cache.position = self.model.next_position(cache.position, n_new)
        cache.seen += n_new
        return logits

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        # transformers' own caches do not fit HybridLM's operators: carry HybridLM's, sized for this call.
        if generation_config.num_beams > 1:
            raise ValueError("num_beams: beam search is not supported (recurrent states are not reordered)")
        if model_kwargs.get("cache") is not None:
            model_kwargs["cache"]._is_user_defined = True
            return
        if generation_config.use_cache is not False:
            model_kwargs["cache"] = HybridnasCache(max_cache_length)
