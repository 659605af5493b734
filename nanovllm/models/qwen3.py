"""Qwen3 (q/k RMSNorm), Qwen2 (qkv bias) and Llama / Mistral (neither): one pre-norm decoder, switched by the config."""
import torch
from torch import nn

from nanovllm.model_config import ModelConfig
from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, norm_and_linear
from nanovllm.layers.rotary_embedding import RotaryEmbedding


class Qwen3Attention(nn.Module):
    """x + residual -> RMSNorm -> q, k, v -> attention -> o_proj; returns (output, x + residual)."""

    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        head_dim = config.head_dim
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias)
        num_heads, num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads    # this rank's
        self.sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        self.attn = Attention(num_heads, num_kv_heads, head_dim, rotary_emb,
                              qk_norm_eps=config.rms_norm_eps if config.qk_norm else None)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None):
        qkv, residual = norm_and_linear(self.input_layernorm, self.qkv_proj, x, residual)
        q, k, v = qkv.split(self.sizes, dim=-1)
        return self.o_proj(self.attn(positions, q, k, v)), residual


class Qwen3MLP(nn.Module):
    """x + residual -> RMSNorm -> down_proj(silu(gate_proj) * up_proj); returns (output, x + residual)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2)
        # SwiGLU's silu(gate) * up is applied by down_proj to its input: fused into its kernel at batch 1-2.
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, gated_input=True)

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
        gate_up, residual = norm_and_linear(self.post_attention_layernorm, self.gate_up_proj, x, residual)
        return self.down_proj(gate_up), residual


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.self_attn = Qwen3Attention(config, rotary_emb)
        self.mlp = Qwen3MLP(config)

    def forward(self, positions, hidden_states, residual):
        hidden_states, residual = self.self_attn(positions, hidden_states, residual)
        return self.mlp(hidden_states, residual)


class Qwen3Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # One cos/sin table for every layer (a table per layer was 21 MB each at Qwen3's 40,960 positions).
        rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                     config.rope_scaling)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(config, rotary_emb) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return self.norm(hidden_states, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    # Checkpoint name part -> (ours, shard id): q/k/v and gate/up are packed into one matmul each; each block owns
    # its pre-norm, and the attention layer its q/k norms.
    checkpoint_names = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                        "input_layernorm": ("self_attn.input_layernorm", None),
                        "post_attention_layernorm": ("mlp.post_attention_layernorm", None),
                        "self_attn.q_norm": ("self_attn.attn.q_norm", None),
                        "self_attn.k_norm": ("self_attn.attn.k_norm", None)}

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.model = Qwen3Model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.lm_head(hidden_states, out)
