"""Generation for OmniMamba: one prefill, then a recurrent decode step per token (CUDA-graphed on GPU), for
text answers (MMU) and image codes with classifier-free guidance (T2I)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from ..decoding import StepRunner, graphs_enabled
from ..errors import UserError
from ..generation import DoneFlag, check_sampling_args, epsilon_floor, make_generator, sample_next_token
from ..lora import TaskLoRALinear
from ..sequence import pad_rows_left


class GenerationMixin:
    """Decoding methods of `OmniMamba` (kept apart from its training forward, as mamba_ssm keeps its
    generation in utils/generation.py)."""

    # Generation runs each route's in_proj as one GEMM on a merged copy W + dW (one per route, made on first
    # use and refreshed when a generation starts): the unmerged LoRA costs two extra small GEMMs per layer
    # and step, about a fifth of a decode step at batch 1. Set False to save the copies' memory.
    decode_with_merged_lora: bool = True
    # dtype of the SSM state while generating. "auto": bfloat16 on a GPU, where it halves the state's memory
    # traffic, most of a step at batch 32 (16 images with guidance: 11.9 -> 14.9 images/s on an H100,
    # benchmarks/results/logs/final_run.log), float32 elsewhere; None: float32. A bf16 state is updated in float32
    # and rounded when stored (what mamba_ssm keeps for bf16 models); what it changes in the outputs is measured
    # by benchmarks/state_dtype.py.
    decode_state_dtype: torch.dtype | str | None = "auto"
    # Prefill a long prompt this many positions at a time (0: all at once), each chunk continuing the cache the
    # last one left: the prefill's activations then grow with the chunk, not with the prompt. Same result.
    prefill_chunk: int = 0
    # Graphed generation replays a recurring prefill (same batch and prompt length, seen before) as a CUDA graph
    # up to this many positions, batch x length (decoding.PrefillGraphs): a short prompt's prefill is ~30 eager
    # kernels per layer, whose launches take longer than running them. Larger prefills run eagerly, so a graph's
    # own buffers stay small (tens of MB at 1.3B). 0: never.
    graph_prefill_max: int = 2048

    def state_dtype_on(self, device) -> torch.dtype | None:
        """The SSM state's dtype for decoding on `device` (decode_state_dtype resolved; None is float32)."""
        d = self.decode_state_dtype
        if isinstance(d, str):
            if d != "auto":
                raise ValueError(f"decode_state_dtype must be 'auto', None or a torch dtype, got {d!r}")
            return torch.bfloat16 if torch.device(device).type == "cuda" else None
        return d

    def prefill(self, x: Tensor, cache, mask: Tensor | None = None, task: str | None = None) -> Tensor:
        """Run embeddings x (b, L, d) (left-padded rows marked by mask) into `cache`; the last hidden states
        (b, d). In chunks of `prefill_chunk` positions when that is set and shorter than L."""
        chunk = self.prefill_chunk or x.size(1)
        for start in range(0, x.size(1), chunk):
            part = None if mask is None else mask[:, start:start + chunk]
            hidden = self.backbone(x[:, start:start + chunk], cache=cache, mask=part, task=task)[:, -1]
        return hidden

    def _prefill_runner(self, runner: StepRunner, x: Tensor, mask: Tensor, task: str | None) -> Tensor:
        """prefill() into a step runner's fresh cache: replayed from a graph where the runner is graphed and
        the prompt recurs (see graph_prefill_max), else eagerly. Returns the last hidden states (b, d), a
        static buffer for a graph: clone it."""
        if not runner.graphed or mask is None or x.size(0) * x.size(1) > self.graph_prefill_max:
            return self.prefill(x, runner.cache, mask, task)
        return runner.prefills(lambda x, mask: self.prefill(x, runner.cache, mask, task), runner.cache, x, mask,
                               tag=(self.prefill_chunk,))

    @contextmanager
    def _decoder(self, kind: str, batch_size: int, device: torch.device, use_cuda_graph: bool | None):
        """For one generation: the route's merged weights active, and a step runner held (see _step_runner)."""
        with self._merged_route(self._route("mmu" if kind == "text" else "t2i")):
            runner = self._step_runner(kind, batch_size, device, use_cuda_graph)
            runner.in_use = True
            try:
                yield runner
            finally:
                runner.in_use = False

    @contextmanager
    def _merged_route(self, route: str | None):
        layers = [layer.mixer.in_proj for layer in self.backbone.layers
                  if isinstance(layer.mixer.in_proj, TaskLoRALinear)]
        if route is None or not layers or not self.decode_with_merged_lora or layers[0].merged_task is not None:
            yield
            return
        if not self._decode_routes.get(route):
            for layer in layers:
                layer.refresh_decode_weight(route)
                layer.decode_active.add(route)
        self._decode_routes[route] = self._decode_routes.get(route, 0) + 1
        try:
            yield
        finally:
            self._decode_routes[route] -= 1
            if not self._decode_routes[route]:
                for layer in layers:
                    layer.decode_active.discard(route)

    def _step_runner(self, kind: str, batch_size: int, device: torch.device, use_cuda_graph: bool | None
                     ) -> StepRunner:
        """The decode step of `kind` ('text' and 'image': (token, its position) -> hidden) over a
        cache of `batch_size` rows. Graphed runners are kept and reused (capture once per batch size and
        task); an eager one, or a graphed one already in use by another generation, gets a fresh cache."""
        route = self._route("mmu" if kind == "text" else "t2i")
        graph = graphs_enabled(use_cuda_graph, self, device)
        state_dtype = self.state_dtype_on(device)

        def build(use_graph: bool) -> StepRunner:
            cache = self.allocate_cache(batch_size, device)
            zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
            if kind == "text":
                def fn(tokens, positions):
                    emb = self.backbone.embedding(tokens)
                    if self.config.mmu_positions:
                        emb = emb + self.mmu_positions(positions).to(emb.dtype)
                    return self.backbone.step(emb, cache, task=route)
                return StepRunner(fn, cache, (zeros, zeros), use_graph)

            def fn(codes, positions):
                emb = self.embed_image_codes(codes) + self.t2i_pos_embed[0][positions]
                return self.backbone.step(emb, cache, task=route)
            return StepRunner(fn, cache, (zeros, zeros), use_graph)

        if graph:
            w = self.lm_head.weight
            key = (kind, batch_size, route, w.device, w.dtype, w.data_ptr(), self.decode_with_merged_lora,
                   state_dtype, self.backbone.fused_decode)
            runner = self._runners.get(key, lambda: build(True))
            if not runner.in_use:
                runner.cache.reset()
                return runner
        return build(False)

    @torch.no_grad()
    def generate_text(self, pixel_values: Tensor, prompt_ids: Tensor, prompt_mask: Tensor | None = None,
                      max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      seed: int | None = None, stream: bool = False, stop_at_eot: bool = True,
                      use_cuda_graph: bool | None = None):
        """MMU: answer tokens (b, new) after [MMU][SOI]{image}[EOI][SOT]{prompt}; stops at the answer's end
        token, special.end (unless
        stop_at_eot=False, which generates max_new_tokens whatever comes, for benchmarks).

        prompt_ids (b, T) left-padded with prompt_mask. With stream=True, yields each step's tokens (b,).
        use_cuda_graph: replay each decode step as a CUDA graph; None means on for CUDA models in eval mode.
        """
        gen = self._generate_text(pixel_values, prompt_ids, prompt_mask, max_new_tokens, temperature, top_k,
                                  top_p, seed, stop_at_eot, use_cuda_graph)
        if stream:
            return gen
        steps = list(gen)
        return torch.stack(steps, 1) if steps else prompt_ids.new_zeros(prompt_ids.size(0), 0)

    @torch.no_grad()
    def _generate_text(self, pixel_values, prompt_ids, prompt_mask, max_new_tokens, temperature, top_k, top_p,
                       seed, stop_at_eot, use_cuda_graph):
        check_sampling_args(temperature, top_k, top_p)
        self._check_text_ids(prompt_ids)
        b = prompt_ids.size(0)
        x, mask, next_position = self.mmu_prefill_inputs(pixel_values, prompt_ids, prompt_mask)
        self.check_mmu_length(int(next_position.max()) + max_new_tokens - 1)  # fail before decoding, not midway
        device = x.device
        with self._decoder("text", b, device, use_cuda_graph) as runner:
            hidden = self._prefill_runner(runner, x, mask, self._route("mmu")).clone()
            del x, mask  # nothing as long as the prompt outlives the prefill: decoding memory stays constant
            generator = make_generator(seed, device)
            finished = torch.zeros(b, dtype=torch.bool, device=device)
            done = DoneFlag(device)
            end = self.special.end
            for i in range(max_new_tokens):
                token = sample_next_token(self.answer_logits(hidden), temperature, top_k, top_p, generator)
                if stop_at_eot:
                    token = token.masked_fill(finished, end)
                    finished |= token == end
                    done.post(finished.all())
                yield token
                if i < max_new_tokens - 1:  # queued before the host learns whether it is needed (DoneFlag)
                    hidden = runner(token, next_position + i)
                if stop_at_eot and done.read():
                    return

    def mmu_prefill_inputs(self, pixel_values: Tensor, prompt_ids: Tensor, prompt_mask: Tensor | None = None
                           ) -> tuple[Tensor, Tensor, Tensor]:
        """What a prefill of [MMU][SOI]{image}[EOI][SOT]{prompt} feeds the backbone, for prompts left-padded
        with prompt_mask: embeddings (b, L, d), their mask (b, L), and where each row's first answer token
        goes (b,). The padding is moved to the front of each row, where the mask makes it leave the state
        exactly as if it were not there (a prompt's padding would otherwise fall between image and text)."""
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        x = self.mmu_embeddings(pixel_values, prompt_ids, prompt_mask)
        n_img = x.size(1) - prompt_ids.size(1)
        mask = torch.cat([prompt_mask.new_ones(prompt_ids.size(0), n_img), prompt_mask], 1)
        mask, x = self._move_padding_left(mask, x)
        return x, mask, mask.sum(1)

    def answer_logits(self, hidden: Tensor) -> Tensor:
        """(b, d) -> float (b, text_vocab) logits of the next answer token: text tokens and the answer's end
        token ([EOT]; end-of-text for official conventions), no other special token. One kernel besides the
        head's (a decode step's worth of small launches used to follow it)."""
        logits = self.text_logits(hidden).float()
        return logits.masked_fill_(self._special_ids_blocked(logits), float("-inf"))

    def _special_ids_blocked(self, logits: Tensor) -> Tensor:
        """(text_vocab,) bool on logits' device: True at the special ids an answer may not take."""
        cache = self.__dict__.setdefault("_answer_masks", {})
        key = (logits.device, logits.size(-1), self.special.end, self.config.text_base_vocab_size)
        if key not in cache:
            blocked = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
            blocked[self.config.text_base_vocab_size:] = True
            blocked[self.special.end] = False
            cache[key] = blocked
        return cache[key]

    @staticmethod
    def _move_padding_left(mask: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Reorder each row so its padded positions come first (the state then ignores them exactly)."""
        order = torch.sort(mask, dim=1, stable=True).indices  # zeros (padding) first, order kept
        return mask.gather(1, order), x.gather(1, order[..., None].expand_as(x))

    def guidance_rows(self, prefix_ids: Tensor, prefix_mask: Tensor, caption_mask: Tensor,
                      null_prefix: tuple[Tensor, Tensor, Tensor] | None = None):
        """The 2b rows of a guided generation: b conditional rows, then b unconditional ones. Those drop the
        caption to the learned null caption, or, for a model without one (official conventions), are the
        null prompt's prefix `null_prefix` (ids, mask, caption mask; one row or b). Returns (ids, mask,
        caption_mask, drop)."""
        b = prefix_ids.size(0)
        if self.caption_embed.null_caption is not None:
            drop = torch.arange(2 * b, device=prefix_ids.device) >= b
            return (*(torch.cat([t, t]) for t in (prefix_ids, prefix_mask, caption_mask)), drop)
        if null_prefix is None:
            raise UserError("this model has no learned null caption (official conventions): guidance needs the "
                            "null prompt's prefix (omnimamba.inference.generate_images builds it)")
        rows = [t.to(prefix_ids.device).expand(b, -1) for t in null_prefix]
        width = max(prefix_ids.size(1), rows[0].size(1))
        fill = (self.special.pad, 0, False)
        out = [torch.cat([pad_rows_left(c, width, v), pad_rows_left(u, width, v)])
               for c, u, v in zip((prefix_ids, prefix_mask, caption_mask), rows, fill)]
        return (*out, None)

    @torch.no_grad()
    def generate_image_codes(self, prefix_ids: Tensor, prefix_mask: Tensor, caption_mask: Tensor,
                             guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                             top_p: float = 1.0, seed: int | None = None, progress=None,
                             use_cuda_graph: bool | None = None,
                             null_prefix: tuple[Tensor, Tensor, Tensor] | None = None, epsilon: float = 0.0) -> Tensor:
        """T2I: image codes (b, N) for left-padded prefixes [T2I][SOT]{caption}[EOT][SOI].

        guidance_scale s: 1 samples from the conditional logits alone; any other s >= 0 runs conditional and
        unconditional rows in one batch (see guidance_rows) and mixes their logits as uncond + s * (cond -
        uncond). epsilon > 0 never samples a code whose conditional probability is below it (epsilon_floor).
        use_cuda_graph: replay each decode step as a CUDA graph; None means on for CUDA models in
        eval mode.
        """
        check_sampling_args(temperature, top_k, top_p, epsilon)
        if guidance_scale < 0:
            raise UserError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self._check_text_ids(prefix_ids)
        b = prefix_ids.size(0)
        cfg = guidance_scale != 1.0
        drop = None
        if cfg:
            prefix_ids, prefix_mask, caption_mask, drop = self.guidance_rows(prefix_ids, prefix_mask, caption_mask,
                                                                             null_prefix)
        N = self.config.image_tokens
        self._t2i_positions(prefix_mask, N - 1, 1)  # checks, once, that the last position exists
        start = torch.full((prefix_ids.size(0),), self.t2i_image_start, device=prefix_ids.device)
        with self._decoder("image", prefix_ids.size(0), prefix_ids.device, use_cuda_graph) as runner:
            x = self.t2i_prefix_embeddings(prefix_ids, prefix_mask, caption_mask, drop)
            hidden = self._prefill_runner(runner, x, prefix_mask, self._route("t2i")).clone()
            del x
            generator = make_generator(seed, prefix_ids.device)
            codes = []
            steps = range(N) if progress is None else progress(range(N))
            for i in steps:
                logits = cond = self.image_logits(hidden).float()
                if cfg:
                    cond = logits[:b]
                    logits = cfg_logits(cond, logits[b:], guidance_scale)
                if epsilon:
                    logits = epsilon_floor(logits, cond, epsilon)
                token = sample_next_token(logits, temperature, top_k, top_p, generator)
                codes.append(token)
                if i == N - 1:
                    break
                hidden = runner(torch.cat([token, token]) if cfg else token, start + i)
        return torch.stack(codes, 1)


def cfg_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance as in LlamaGen / Show-o: uncond + s * (cond - uncond)."""
    return uncond + scale * (cond - uncond)
