"""An independent forward of the official OmniMamba, written from its code's structure and run directly on a
state dict under the official names (no omnimamba module is used): the check that every tensor our loader
reads lands where the official forward would use it.

    MixerModel.forward (models/stage2/mixer_seq_simple.py): fused add + RMSNorm before each mixer, residual in
        fp32; MMU adds mmu_pos_embed at every position; T2I adds pos_embed (to the caption_embed'ed prefix and
        to each img_embeddings'ed code); norm_f, then lm_head / img_head.
    Mamba2 (mamba_ssm/modules/mamba2.py), one token at a time: in_proj -> [z, xBC, dt]; causal depthwise conv +
        SiLU on xBC; h <- exp(dt A) h + dt x B^T; y = h C + D x; RMSNorm(y * SiLU(z)) (norm_before_gate False);
        out_proj. in_proj carries the active task's LoRA route: + (alpha / r) B A x (models/stage2/lora.py).
    Vision (dinosiglip_vit.py): each timm featurizer's second-to-last block patches, concatenated; projector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LLM = "llm_backbone.mamba."


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mlp3(sd, prefix, x):  # Prismatic's FusedMLPProjector (exact GELU)
    for i in (0, 2):
        x = F.gelu(F.linear(x, sd[f"{prefix}.{i}.weight"], sd[f"{prefix}.{i}.bias"]))
    return F.linear(x, sd[f"{prefix}.4.weight"], sd[f"{prefix}.4.bias"])


class OfficialReference:
    def __init__(self, sd: dict, d_state: int, headdim: int, lora_scaling: float = 32 / 8):
        self.sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
        self.d_state, self.headdim, self.scaling = d_state, headdim, lora_scaling
        self.n_layer = len({k.split(".")[4] for k in sd if k.startswith(LLM + "backbone.layers.")})

    def p(self, name):
        return self.sd[LLM + name]

    # --- one Mamba-2 layer, recurrent -------------------------------------------------------------------
    def new_state(self):
        return [None] * self.n_layer

    def mixer_step(self, i, u, task, state):
        pre = f"backbone.layers.{i}.mixer."
        zxbcdt = F.linear(u, self.p(pre + "in_proj.weight"))
        low = F.linear(u, self.p(pre + f"in_proj.{task}_lora_A0.weight"))
        zxbcdt = zxbcdt + self.scaling * F.linear(low, self.p(pre + f"in_proj.{task}_lora_B0.weight"))
        nheads = self.p(pre + "A_log").numel()
        d_inner = nheads * self.headdim
        z, xbc, dt = zxbcdt.split([d_inner, d_inner + 2 * self.d_state, nheads], -1)
        w = self.p(pre + "conv1d.weight")[:, 0]  # (channels, d_conv)
        conv, h = state if state is not None else (torch.zeros(xbc.size(0), w.size(0), w.size(1), dtype=u.dtype),
                                                      torch.zeros(xbc.size(0), nheads, self.headdim, self.d_state,
                                                                  dtype=u.dtype))
        conv = torch.cat([conv[:, :, 1:], xbc[:, :, None]], -1)
        xbc = F.silu((conv * w).sum(-1) + self.p(pre + "conv1d.bias"))
        x, B, C = xbc.split([d_inner, self.d_state, self.d_state], -1)
        dt = F.softplus(dt + self.p(pre + "dt_bias"))
        A = -torch.exp(self.p(pre + "A_log"))
        x = x.view(-1, nheads, self.headdim)
        h = h * torch.exp(dt * A)[..., None, None] + dt[..., None, None] * x[..., None] * B[:, None, None, :]
        y = (h * C[:, None, None, :]).sum(-1) + self.p(pre + "D")[:, None] * x
        y = rms(y.reshape(-1, d_inner) * F.silu(z), self.p(pre + "norm.weight"))
        return F.linear(y, self.p(pre + "out_proj.weight")), (conv, h)

    def step(self, emb, task, state):
        """One position through the backbone: (b, d) input embedding -> (b, d) final hidden state."""
        hidden, residual = emb, None
        for i in range(self.n_layer):
            residual = hidden if residual is None else hidden + residual
            hidden, state[i] = self.mixer_step(i, rms(residual, self.p(f"backbone.layers.{i}.norm.weight")), task,
                                               state[i])
        return rms(hidden + residual, self.p("backbone.norm_f.weight"))

    # --- embeddings --------------------------------------------------------------------------------------
    def embed(self, ids):
        return self.p("backbone.embedding.weight")[ids]

    def vision(self, featurizers, pixels01):
        """featurizers: the timm models (built as the release builds them, loaded from the state dict)."""
        feats = []
        for name, m in featurizers.items():
            cfg = m.pretrained_cfg
            mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
            std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
            feats.append(m.get_intermediate_layers(((pixels01 - mean) / std).float(), n={len(m.blocks) - 2})[0])
        return mlp3(self.sd, "projector.projector", torch.cat(feats, -1).double())

    def caption_embed(self, x):
        h = F.gelu(F.linear(x, self.p("backbone.caption_embed.cap_proj.fc1.weight")), approximate="tanh")
        return F.linear(h, self.p("backbone.caption_embed.cap_proj.fc2.weight"))

    def img_embed(self, codes):
        return mlp3(self.sd, LLM + "backbone.img_embeddings.project_in.projector",
                    self.p("backbone.img_embeddings.word_embeddings.weight")[codes])

    # --- the two tasks, greedy, as scripts/inference_{mmu,t2i}.py --------------------------------------------
    def mmu_greedy(self, image_emb, special, question_ids, steps):
        """[mmu][soi] image [eoi][sot] question, mmu_pos_embed added; greedy answer ids and their logits."""
        ids = lambda t: self.embed(torch.tensor(t))  # noqa: E731
        seq = [ids([special["mmu"]]), ids([special["soi"]]), image_emb[0], ids([special["eoi"]]),
               ids([special["sot"]]), ids(question_ids)]
        x = torch.cat(seq)
        pos = self.p("backbone.mmu_pos_embed")[0]
        state = self.new_state()
        for t in range(x.size(0)):
            hidden = self.step((x[t] + pos[t])[None], "mmu", state)
        out, logits = [], []
        for k in range(steps):
            lg = F.linear(hidden, self.p("lm_head.weight"))
            logits.append(lg[0])
            tok = int(lg[0].argmax())
            out.append(tok)
            hidden = self.step(self.embed(torch.tensor([tok])) + pos[x.size(0) + k], "mmu", state)
        return out, torch.stack(logits)

    def t2i_greedy(self, prefix_ids, steps):
        """Prefix (caption_embed'ed, pos_embed added), then greedy codes through img_embeddings/img_head."""
        pos = self.p("backbone.pos_embed")[0]
        x = self.caption_embed(self.embed(torch.tensor(prefix_ids))) + pos[: len(prefix_ids)]
        state = self.new_state()
        for t in range(x.size(0)):
            hidden = self.step(x[t][None], "t2i", state)
        codes = []
        for k in range(steps):
            code = int(F.linear(hidden, self.p("img_head.weight"))[0].argmax())
            codes.append(code)
            hidden = self.step(self.img_embed(torch.tensor([code])) + pos[len(prefix_ids) + k], "t2i", state)
        return codes
