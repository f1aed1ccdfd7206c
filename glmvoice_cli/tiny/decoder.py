"""A random speech decoder of any size, written as THUDM/glm-4-voice-decoder is on disk.

`config.yaml` uses the official hyperpyyaml tags and nesting (`!new:`, `!apply:`, `!ref`, the
unused `llm` section included), `flow.pt` and `hift.pt` are plain `torch.save`d state dicts
with the official keys, weight-norm pairs (`weight_g`/`weight_v`) included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from glmvoice_cli.decoder.checkpoint import FLOW_FILE, HIFT_FILE, DecoderModels
from glmvoice_cli.decoder.config import (
    CONFIG_FILE,
    DecoderConfig,
    decoder_config_from_data,
    parse_hyperpyyaml,
)

VOICED_F0_HZ = 120.0  # bias of the random F0 head, so that the source is mostly voiced


@dataclass(frozen=True)
class TinyDecoderSpec:
    """Sizes of a random decoder; `REAL_DECODER_SPEC` gives the published sizes."""

    vocab_size: int = 64  # = the speech tokenizer's codebook size
    flow_dim: int = 32  # token embedding = encoder width
    encoder_heads: int = 2
    encoder_linear_units: int = 64
    encoder_blocks: int = 1
    estimator_channels: int = 32  # multiple of 8 (GroupNorm groups)
    estimator_head_dim: int = 16
    estimator_heads: int = 2
    estimator_n_blocks: int = 1
    estimator_mid_blocks: int = 1
    hift_channels: int = 32  # multiple of 4
    f0_channels: int = 16
    seed: int = 0


REAL_DECODER_SPEC = TinyDecoderSpec(
    vocab_size=16384, flow_dim=512, encoder_heads=8, encoder_linear_units=2048, encoder_blocks=6,
    estimator_channels=256, estimator_head_dim=64, estimator_heads=8, estimator_n_blocks=4,
    estimator_mid_blocks=12, hift_channels=512, f0_channels=512,
)

_TEMPLATE = """\
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: 22050
text_encoder_input_size: 32
llm_input_size: 32
llm_output_size: 32
spk_embed_dim: 192

# model params
# (the text LM below is unused by GLM-4-Voice; the published file has it, so the format keeps it)
llm: !new:cosyvoice.llm.llm.TransformerLM
    text_encoder_input_size: !ref <text_encoder_input_size>
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    text_token_size: 51866
    speech_token_size: 4096
    length_normalized_loss: True
    lsm_weight: 0
    spk_embed_dim: !ref <spk_embed_dim>
    text_encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        input_size: !ref <text_encoder_input_size>
        output_size: 32
        attention_heads: 2
        linear_units: 64
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        use_cnn_module: False
        macaron_style: False
        use_dynamic_chunk: False
        use_dynamic_left_chunk: False
        static_chunk_size: 1
    llm: !new:cosyvoice.transformer.encoder.TransformerEncoder
        input_size: !ref <llm_input_size>
        output_size: !ref <llm_output_size>
        attention_heads: 2
        linear_units: 64
        num_blocks: 1
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0
        input_layer: 'linear_legacy'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: 1

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {flow_dim}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {vocab_size}
    input_frame_rate: 12.5
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.BlockConformerEncoder
        output_size: {flow_dim}
        attention_heads: {encoder_heads}
        linear_units: {encoder_linear_units}
        num_blocks: {encoder_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'block_rel_selfattn'
        block_size: 10
        input_size: {flow_dim}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1, 1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{estimator_channels}, {estimator_channels}]
            dropout: 0
            attention_head_dim: {estimator_head_dim}
            n_blocks: {estimator_n_blocks}
            num_mid_blocks: {estimator_mid_blocks}
            num_heads: {estimator_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_channels}
"""


def decoder_yaml(spec: TinyDecoderSpec) -> str:
    """The hyperpyyaml text of a decoder of these sizes."""
    fields = {k: v for k, v in spec.__dict__.items() if k != "seed"}
    return _TEMPLATE.format(**fields)


def random_decoder(spec: TinyDecoderSpec, config: DecoderConfig, fold: bool = True) -> DecoderModels:
    """Randomly initialised flow and HiFT (global RNG untouched), with non-trivial norms and biases.

    `fold=False` keeps the weight-norm pairs, as the published files store them.
    """
    from glmvoice_cli.decoder.flow import FlowModel
    from glmvoice_cli.decoder.vocoder import HiFTGenerator, Snake, WNConv1d

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        flow, hift = FlowModel(config.flow), HiFTGenerator(config.hift)
        with torch.no_grad():
            for module in hift.modules():
                if isinstance(module, WNConv1d) and module.weight_g is not None:  # g != ||v||, as published
                    gain = 0.3 if module is hift.conv_post else 1.0  # keep exp(magnitude) moderate
                    module.weight_g.copy_((torch.rand_like(module.weight_g) * 0.5 + 0.75) * gain)
                    module.bias.normal_(0.0, 0.01)
                elif isinstance(module, Snake):
                    module.alpha.copy_(1.0 + 0.1 * torch.randn_like(module.alpha))
            hift.f0_predictor.classifier.bias.fill_(VOICED_F0_HZ)
            hift.f0_predictor.classifier.weight.mul_(5.0)
    if fold:
        hift.fold_weight_norm()
    flow.requires_grad_(False).eval()
    hift.requires_grad_(False).eval()
    return DecoderModels(config=config, flow=flow, hift=hift)


def write_tiny_decoder(directory: Path, spec: TinyDecoderSpec = TinyDecoderSpec()) -> Path:
    """Write config.yaml, flow.pt and hift.pt into `directory` (created); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(decoder_yaml(spec), encoding="utf-8")
    config = decoder_config_from_data(parse_hyperpyyaml(decoder_yaml(spec)), directory / CONFIG_FILE)
    models = random_decoder(spec, config, fold=False)
    torch.save({k: v.clone() for k, v in models.flow.state_dict().items()}, directory / FLOW_FILE)
    torch.save({k: v.clone() for k, v in models.hift.state_dict().items()}, directory / HIFT_FILE)
    return directory


def tiny_decoder(spec: TinyDecoderSpec = TinyDecoderSpec()) -> DecoderModels:
    """A random decoder in memory, built through the same YAML path as a written one."""
    config = decoder_config_from_data(parse_hyperpyyaml(decoder_yaml(spec)))
    return random_decoder(spec, config)
