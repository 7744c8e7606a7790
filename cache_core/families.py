"""Every model family the pack knows, in one registry: its block contract, what it can do,
and its tuned preset.

A block-level entry says which diffusion-model classes it is, where its block lists are, under
which ``patches_replace["dit"]`` keys the model's forward calls them, and which tensors the
forward reads back from a block patch (the ones that evolve from block to block: FLUX's double
blocks carry ``img`` and ``txt``; Wan's blocks carry ``img`` and only read ``txt``). An
output-level entry (no blocks) is a model whose forward calls no block patches: the cache
forecasts its output as a whole. A model of no entry is treated as output level too, and the
test suite fails for any diffusion-model class of the supported ComfyUI versions that has none.

The adapters, the Options node's preset list, the Edit Region, the memory estimate and the
README's model table all read this registry. Adding a family is one entry here plus its tiny
real-class test (tests/comfy/test_families.py).

Facts about each forward are from ComfyUI's source (0.3.64, 0.8.0 and 0.29.0). Pure data: nothing here
imports ComfyUI (classes are named by their import path)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Capabilities a family may have beyond forecasting at its level.
BLOCK_GRANULARITY = "block_granularity"    # per-block forecasts (TaylorSeer), ClusCa, token tiers:
                                           # FLUX-layer blocks (comfy.ldm.flux.layers)
EDIT_REGION = "edit_region"                # the Edit Region node (EEdit)

# The tuned preset of models forecast at output level: no per-step verification there, so
# bounded fixed-interval forecasting (preset "auto" outside lookback, and preset "generic").
OUTPUT_LEVEL_PRESET = {"max_forecast_steps": 2, "order": 1}


@dataclass(frozen=True)
class BlockList:
    kind: str                 # the patches_replace["dit"] key kind: ("double_block", i)
    attr: str                 # the model attribute holding the nn.ModuleList
    carries: tuple            # tensors the forward reads back from the patch's output
    skip_attr: str | None = None   # a model attribute listing block indices the forward skips
    last_carries: tuple | None = None  # what the last block returns, where it differs


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple                  # diffusion-model classes ("module.Class")
    blocks: tuple = ()              # BlockLists in execution order; () for output level
    subclasses: bool = False        # also match subclasses (they must keep the same forward)
    # transformer_options["patches"] kinds that the forward applies between blocks (added
    # residuals the stack forecast would count twice): present -> output level for that run
    between_block_patches: tuple = ()
    # whether the cache is driven from APPLY_MODEL (the forward has no DIFFUSION_MODEL hook)
    apply_model_level: bool = False
    # the forward adds residuals of its own after some blocks (outside the block patches) that
    # do not depend on the hidden state (Wan VACE): stage residuals are then summed block by
    # block from what each block itself added, as with a ControlNet
    adds_between_blocks: bool = False
    capabilities: frozenset = frozenset()
    # Tuned settings (CacheConfig fields) for preset "auto" and the family's own preset; None:
    # the node's defaults (block level) or OUTPUT_LEVEL_PRESET (output level).
    preset: dict | None = field(default=None, compare=False)
    notes: str = field(default="", compare=False)

    @property
    def block_level(self) -> bool:
        return bool(self.blocks)

    @property
    def tuned(self) -> dict:
        """The settings preset "auto" gives this family (what the user did not set)."""
        if self.preset is not None:
            return dict(self.preset)
        return {} if self.block_level else dict(OUTPUT_LEVEL_PRESET)


FAMILIES: tuple[Family, ...] = (
    Family("chroma", ("comfy.ldm.chroma.model.Chroma",),
           (BlockList("double_block", "double_blocks", ("img", "txt"), skip_attr="skip_mmdit"),
            BlockList("single_block", "single_blocks", ("img",), skip_attr="skip_dit")),
           subclasses=True, capabilities=frozenset({BLOCK_GRANULARITY}), notes="Chroma, Chroma Radiance"),
    Family("flux", ("comfy.ldm.flux.model.Flux",),
           (BlockList("double_block", "double_blocks", ("img", "txt")),
            BlockList("single_block", "single_blocks", ("img",))),
           subclasses=True, capabilities=frozenset({BLOCK_GRANULARITY, EDIT_REGION}),
           notes="FLUX.1 dev/schnell/Kontext/Fill, FLUX.2 (0.8.0)"),
    Family("hunyuan_video", ("comfy.ldm.hunyuan_video.model.HunyuanVideo",),
           (BlockList("double_block", "double_blocks", ("img", "txt")),
            BlockList("single_block", "single_blocks", ("img",))),
           subclasses=True, capabilities=frozenset({BLOCK_GRANULARITY}),
           notes="HunyuanVideo, HunyuanVideo 1.5 (0.8.0), HunyuanImage 2.1"),
    # Single-stream blocks under "double_block" keys; the text context is read, not changed.
    Family("wan", ("comfy.ldm.wan.model.WanModel", "comfy.ldm.wan.model.CameraWanModel",
                   "comfy.ldm.wan.model.SCAILWanModel", "comfy.ldm.wan.model.SCAIL2WanModel"),
           (BlockList("double_block", "blocks", ("img",)),),
           notes="Wan 2.1 / 2.2 t2v, i2v, Fun inpaint, Fun camera (its adapter adds to the input, "
                 "before the blocks), SCAIL / SCAIL-2 (0.29; the pose tokens ride in img); the S2V and "
                 "HuMo subclasses compute features between blocks and stay at output level"),
    # VACE: after some blocks the forward adds the output of a VACE block, computed from the
    # embedded input and the control video (never from the hidden state); VACE blocks run for
    # real on every step.
    Family("wan_vace", ("comfy.ldm.wan.model.VaceWanModel",),
           (BlockList("double_block", "blocks", ("img",)),),
           adds_between_blocks=True, notes="Wan 2.1 VACE, Wan 2.2 Fun VACE"),
    Family("qwen_image", ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",),
           (BlockList("double_block", "transformer_blocks", ("img", "txt")),),
           between_block_patches=("double_block",),
           notes="Qwen-Image, Qwen-Image-Edit (reference-image tokens ride in img)"),
    # ComfyUI 0.29: dual-stream blocks that carry image and text, as Qwen-Image's.
    Family("joyimage", ("comfy.ldm.joyimage.model.JoyImageTransformer3DModel",),
           (BlockList("double_block", "double_blocks", ("img", "txt")),), notes="JoyImage (0.29)"),
    Family("lens_mageflow", ("comfy.ldm.lens.model.LensTransformer2DModel",
                             "comfy.ldm.mage_flow.model.MageFlowTransformer2DModel"),
           (BlockList("double_block", "transformer_blocks", ("img", "txt")),),
           between_block_patches=("double_block",), notes="Lens, MageFlow (0.29)"),
    Family("ltxv", ("comfy.ldm.lightricks.model.LTXVModel",),
           (BlockList("double_block", "transformer_blocks", ("img",)),)),
    # Double layers carry image and text; the single layers run on text and image joined,
    # passed to the patch as "img".
    Family("auraflow", ("comfy.ldm.aura.mmdit.MMDiT",),
           (BlockList("double_block", "double_layers", ("img", "txt")),
            BlockList("single_block", "single_layers", ("img",))),
           notes="AuraFlow"),
    Family("mochi", ("comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint",),
           (BlockList("double_block", "blocks", ("img", "txt")),),
           apply_model_level=True, notes="Mochi preview (no DIFFUSION_MODEL hook: driven from APPLY_MODEL)"),
    # MMDiT's last block is "context pre-only": it returns no text stream.
    Family("sd3", ("comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper",),
           (BlockList("double_block", "joint_blocks", ("img", "txt"), last_carries=("img",)),),
           apply_model_level=True, notes="SD3, SD3.5 (no DIFFUSION_MODEL hook: driven from APPLY_MODEL)"),

    # ---- output level: the forward calls no block patches ----------------------------------
    Family("lumina2", ("comfy.ldm.lumina.model.NextDiT",), subclasses=True,
           notes="Lumina 2, Z-Image (0.8.0), NetaYume, its pixel-space variant (0.29)"),
    Family("hidream", ("comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",), notes="HiDream"),
    Family("cosmos", ("comfy.ldm.cosmos.model.GeneralDIT", "comfy.ldm.cosmos.predict2.MiniTrainDIT"), subclasses=True,
           notes="Cosmos 1.0, Cosmos Predict2, Anima (0.29)"),
    Family("omnigen2", ("comfy.ldm.omnigen.omnigen2.OmniGen2Transformer2DModel",), notes="OmniGen2"),
    # Its forward does call block patches, but ComfyUI 0.8.0's own patch path is broken: the
    # original block it hands to a patch calls TransformerDecoderBlock.forward(x=...), whose
    # parameter is named visual_embed, so any dit block patch raises a TypeError there.
    Family("kandinsky5", ("comfy.ldm.kandinsky5.model.Kandinsky5",),
           notes="Kandinsky 5 (0.8.0); calls block patches, but its block-patch path raises in ComfyUI itself"),
    Family("wan_features_between_blocks", ("comfy.ldm.wan.model.WanModel_S2V", "comfy.ldm.wan.model.HumoWanModel",
                                           "comfy.ldm.wan.model_animate.AnimateWanModel"),
           notes="Wan S2V, HuMo, Animate: they call block patches but compute features between blocks"),
    Family("ltxav", ("comfy.ldm.lightricks.av_model.LTXAVModel",),
           notes="LTX-2 audio-video (0.8.0); calls block patches, no block contract written yet. Its "
                 "latent is nested (video, audio): forecast at APPLY_MODEL, where it is one tensor"),
    Family("pixart", ("comfy.ldm.pixart.pixartms.PixArtMS",), notes="PixArt Sigma"),
    Family("hunyuan_dit", ("comfy.ldm.hydit.models.HunYuanDiT",),
           notes="Hunyuan-DiT; calls block patches, no block contract written yet"),
    Family("hunyuan3d", ("comfy.ldm.hunyuan3d.model.Hunyuan3Dv2", "comfy.ldm.hunyuan3dv2_1.hunyuandit.HunYuanDiTPlain"),
           notes="Hunyuan3D 2.0 / 2.1; call block patches, no block contract written yet"),
    Family("audio", ("comfy.ldm.audio.dit.AudioDiffusionTransformer", "comfy.ldm.ace.model.ACEStepTransformer2DModel",
                     "comfy.ldm.ace.ace_step15.AceStepConditionGenerationModel"),
           notes="Stable Audio, ACE-Step, ACE-Step 1.5 (0.29); Stable Audio calls block patches, no block contract "
                 "written yet"),
    # ComfyUI 0.29 (July 2026): not analysed at block level yet; their forwards call no block patches
    # unless the note says so.
    Family("image_dits_0_29", ("comfy.ldm.boogu.model.BooguTransformer2DModel",
                               "comfy.ldm.ernie.model.ErnieImageModel",
                               "comfy.ldm.ideogram4.model.Ideogram4Transformer2DModel",
                               "comfy.ldm.krea2.model.SingleStreamDiT",
                               "comfy.ldm.pixeldit.model.PixDiT_T2I", "comfy.ldm.pixeldit.pid.PidNet",
                               "comfy.ldm.triposplat.model.LatentSeqMMFlowModel"),
           notes="Boogu, Ernie-Image, Ideogram 4, Krea 2, PixelDiT, TripoSplat (0.29)"),
    Family("video_dits_0_29", ("comfy.ldm.cogvideo.model.CogVideoXTransformer3DModel",),
           notes="CogVideoX (0.29)"),
    Family("patching_dits_0_29", ("comfy.ldm.hidream_o1.model.HiDreamO1Transformer", "comfy.ldm.seedvr.model.NaDiT"),
           notes="HiDream-O1, SeedVR (0.29); they call block patches, no block contract written yet (SeedVR's "
                 "blocks carry variable-length video and text with their shapes)"),
    Family("wan_variants_0_29", ("comfy.ldm.wan.ar_model.CausalWanModel", "comfy.ldm.wan.model_wandancer.WanDancerModel"),
           notes="Wan 2.1 CausalAR (denoises frame chunks against a KV cache of the frames before), WanDancer "
                 "(adds music features between blocks) (0.29); they call block patches, but the stack "
                 "forecast would miss what they add between blocks"),
    Family("vision_0_29", ("comfy.ldm.depth_anything_3.model.DepthAnything3Net", "comfy.ldm.rt_detr.rtdetr_v4.RTv4",
                           "comfy.ldm.sam3.detector.SAM3Model"),
           notes="Depth Anything 3, RT-DETR v4, SAM 3 (0.29): not diffusion models; nothing to forecast"),
    Family("unet", ("comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "comfy.ldm.cascade.stage_b.StageB", "comfy.ldm.cascade.stage_c.StageC"),
           notes="SD1.5, SDXL and other U-Nets, Stable Cascade (Token Pruning node for SD1.5/SDXL)"),
)

# Block-level classes newer than the oldest ComfyUI the pack supports (0.3.64): the version
# that added each (on older versions the registry test accepts their absence).
ADDED_IN = {
    "comfy.ldm.wan.model.SCAILWanModel": "0.29.0",
    "comfy.ldm.wan.model.SCAIL2WanModel": "0.29.0",
    "comfy.ldm.joyimage.model.JoyImageTransformer3DModel": "0.29.0",
    "comfy.ldm.lens.model.LensTransformer2DModel": "0.29.0",
    "comfy.ldm.mage_flow.model.MageFlowTransformer2DModel": "0.29.0",
}

# Any model of no entry: output level, with the output-level preset.
GENERIC = Family("generic", (), notes="any other model: output level")
BY_NAME = {f.name: f for f in (*FAMILIES, GENERIC)}


def _class_paths(obj, subclasses: bool) -> set:
    mro = type(obj).__mro__ if subclasses else (type(obj),)
    return {f"{c.__module__}.{c.__qualname__}" for c in mro}


def family_of(diffusion_model) -> Family:
    """The registry's entry for a diffusion model (GENERIC when it has none)."""
    for fam in FAMILIES:
        if _class_paths(diffusion_model, fam.subclasses) & set(fam.classes):
            return fam
    return GENERIC


def known_classes() -> set:
    """Every diffusion-model class path the registry names."""
    return {c for fam in FAMILIES for c in fam.classes}


def block_plan(diffusion_model, fam: Family) -> list:
    """[(key, carried tensors), ...] in execution order, skipped blocks left out."""
    blocks = []
    for bl in fam.blocks:
        skip = set(getattr(diffusion_model, bl.skip_attr, None) or []) if bl.skip_attr else set()
        for i in range(len(getattr(diffusion_model, bl.attr, None) or [])):
            if i not in skip:
                blocks.append(((bl.kind, i), bl.carries))
    if blocks and fam.blocks[-1].last_carries is not None:
        key, _ = blocks[-1]
        blocks[-1] = (key, fam.blocks[-1].last_carries)
    return blocks
