"""The original Stable Diffusion (LDM/SGM) UNet module names of a diffusers ``UNet2DConditionModel``.

sd-scripts trains SDXL (and some older tools SD 1.x) on the original UNet of CompVis/Stability, so its kohya
files name modules ``input_blocks_4_1_transformer_blocks_0_attn1_to_q`` rather than diffusers'
``down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``. This module derives, from the structure of the
diffusers model itself (its blocks, their resnets/attentions/samplers), the LDM path of every module:

====================================  =======================================================================
diffusers                             LDM / SGM
====================================  =======================================================================
``conv_in``                           ``input_blocks.0.0``
``time_embedding.linear_{1,2}``       ``time_embed.{0,2}``
``add_embedding.linear_{1,2}``        ``label_emb.0.{0,2}`` (SDXL)
``down_blocks.i.resnets.j``           ``input_blocks.n.0`` with ``n`` counting every resnet and downsampler
                                      of the down path from 1 (``conv_in`` is 0)
``down_blocks.i.attentions.j``        ``input_blocks.n.1`` (the same ``n`` as resnet ``j``)
``down_blocks.i.downsamplers.0.conv``  ``input_blocks.n.0.op`` (its own ``n``)
``mid_block.resnets.0`` / ``.1``      ``middle_block.0`` / ``middle_block.2``
``mid_block.attentions.0``            ``middle_block.1``
``up_blocks.i.resnets.j``             ``output_blocks.n.0`` with ``n`` counting every resnet from 0
``up_blocks.i.attentions.j``          ``output_blocks.n.1``
``up_blocks.i.upsamplers.0.conv``     ``output_blocks.n.2.conv`` (``.1.conv`` in blocks without attention),
                                      ``n`` of the block's last resnet
``conv_norm_out`` / ``conv_out``      ``out.0`` / ``out.2``
====================================  =======================================================================

Inside a resnet: ``norm1 → in_layers.0``, ``conv1 → in_layers.2``, ``time_emb_proj → emb_layers.1``,
``norm2 → out_layers.0``, ``conv2 → out_layers.3``, ``conv_shortcut → skip_connection``. Attention (transformer)
blocks keep their names (``proj_in``, ``transformer_blocks.k.attn1.to_q``, ``ff.net.2``, ...). This is the
layout diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` and ``_convert_unet_lora_key`` undo (written here from
the structure, so SD 1.x-shaped UNets, whose first up block has an upsampler but no attention, map too).
"""

from __future__ import annotations

from torch import nn

__all__ = ["is_diffusers_unet", "ldm_paths", "LDM_STARTS"]

# the first component of an LDM name (kohya keys: "lora_unet_" + these with '.' -> '_')
LDM_STARTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")

_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_SAMPLER = {"down": {"conv": "op"}, "up": {"conv": "conv"}}


def is_diffusers_unet(model: nn.Module) -> bool:
    """Whether ``model`` has the block structure of diffusers' ``UNet2DConditionModel`` (``down_blocks``,
    ``up_blocks`` lists of blocks with ``resnets``)."""
    down, up = getattr(model, "down_blocks", None), getattr(model, "up_blocks", None)
    return (
        isinstance(down, nn.ModuleList)
        and isinstance(up, nn.ModuleList)
        and all(isinstance(getattr(b, "resnets", None), nn.ModuleList) for b in [*down, *up])
    )


def _count(block: nn.Module, attr: str) -> int:
    part = getattr(block, attr, None)
    return len(part) if isinstance(part, nn.ModuleList) else 0


def _blocks(model: nn.Module) -> dict[str, tuple[str, dict[str, str] | None]]:
    """diffusers block path -> (its LDM path, renames of its children; None: names kept)."""
    table: dict[str, tuple[str, dict[str, str] | None]] = {k: (v, {}) for k, v in _TOP.items()}
    n = 1
    for i, block in enumerate(model.down_blocks):
        attentions = _count(block, "attentions")
        for j in range(len(block.resnets)):
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{n}.0", _RESNET)
            if j < attentions:
                table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{n}.1", None)
            n += 1
        if _count(block, "downsamplers"):
            table[f"down_blocks.{i}.downsamplers.0"] = (f"input_blocks.{n}.0", _SAMPLER["down"])
            n += 1
    mid = getattr(model, "mid_block", None)
    if mid is not None and isinstance(getattr(mid, "resnets", None), nn.ModuleList):
        for j in range(len(mid.resnets)):
            table[f"mid_block.resnets.{j}"] = (f"middle_block.{2 * j}", _RESNET)
        for j in range(_count(mid, "attentions")):
            table[f"mid_block.attentions.{j}"] = (f"middle_block.{2 * j + 1}", None)
    n = 0
    for i, block in enumerate(model.up_blocks):
        attentions = _count(block, "attentions")
        last = len(block.resnets) - 1
        for j in range(len(block.resnets)):
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{n}.0", _RESNET)
            if j < attentions:
                table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{n}.1", None)
            if j == last and _count(block, "upsamplers"):
                table[f"up_blocks.{i}.upsamplers.0"] = (
                    f"output_blocks.{n}.{2 if j < attentions else 1}",
                    _SAMPLER["up"],
                )
            n += 1
    return table


def ldm_paths(model: nn.Module) -> dict[str, str]:
    """diffusers module path -> its LDM/SGM path, for every module of a diffusers UNet inside the mapped blocks
    (``{}`` for other models). Children of a resnet or sampler outside the renames above (activations, dropout)
    and modules outside the blocks are left out."""
    if not is_diffusers_unet(model):
        return {}
    table = _blocks(model)
    out: dict[str, str] = {}
    for path, _ in model.named_modules():
        if path in table:
            out[path] = table[path][0]
            continue
        head, rest = path, ""
        while "." in head:
            head, _, last = head.rpartition(".")
            rest = f"{last}.{rest}" if rest else last
            if head in table:
                ldm, renames = table[head]
                if renames is None:
                    out[path] = f"{ldm}.{rest}"
                elif rest in renames:
                    out[path] = f"{ldm}.{renames[rest]}"
                break
    return out
