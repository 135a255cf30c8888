"""PyTorch checkpoints in and out: official Swin / DeiT / MoBY / EsViT / DINO ``.pth`` <-> Flax variables.

Why: runs continue from (and evaluators read) the released checkpoints, and a Flax-pretrained Swin goes
to the PyTorch detection / segmentation code. Usage::

    python -m swin_ssl.convert import moby_swin_t_300ep_pretrained.pth --model swin_tiny --out moby.msgpack
    python -m swin_ssl.convert import esvit_swin_t_w7.pth --model swin_tiny --out esvit.msgpack   # eps 1e-6 set
    python -m swin_ssl.convert import swin_tiny_patch4_window7_224.pth --model swin_tiny --window-size 14 \
        --out w14.msgpack                                                              # tables resized 7 -> 14
    python -m swin_ssl.convert export moby.msgpack --out moby_again.pth                # the full MoBY layout back
    python -m swin_ssl.convert export esvit.msgpack --which teacher --out swin_t_esvit.pth   # {'model': backbone}
    python -m swin_ssl.convert export runs/esvit --network target --out teacher.pth    # a training workdir
    python -m swin_ssl.convert inspect some.pth                                        # layout + architecture guess

Modules, one job each (everything public is re-exported here, so ``from swin_ssl import convert`` is enough):

============  ==========================================================================================
pth           reading / writing ``.pth`` files (``torch.load(weights_only=True)``, a restricted fallback)
layouts       the torch key layouts (official/timm Swin, DeiT, MoBY, EsViT, DINO), Flax path <-> torch key
resize        bicubic resizing of relative-position tables and ViT position embeddings (PyTorch's kernel)
modules       the Flax backbone / heads a checkpoint is loaded into, their variables' shapes
importing     flat torch state -> converted dict, strict by default (:func:`import_checkpoint`)
exporting     converted dict / backbone / training workdir -> official ``.pth`` state (:func:`export_state`)
converted     the converted ``.msgpack`` file (format and ``meta``), its backbone and train-state parts
cli           ``python -m swin_ssl.convert import|export|inspect``
============  ==========================================================================================
"""
from swin_ssl.convert.cli import main
from swin_ssl.convert.converted import (FORMAT, load_backbone, load_backbone_from, load_converted, save_converted,
                                        train_state_parts)
from swin_ssl.convert.errors import ConversionError
from swin_ssl.convert.exporting import export_backbone, export_slot, export_state, export_workdir
from swin_ssl.convert.importing import IGNORED_BUFFERS, Report, import_checkpoint, import_state
from swin_ssl.convert.layouts import (DEFAULT_BACKBONE, MOBY_SLOTS, Slot, detect_layout, guess_architecture,
                                      layout_slots, layout_slots_from_meta)
from swin_ssl.convert.modules import build_backbone, build_head, init_variables
from swin_ssl.convert.pth import TORCH_HINT, _Opaque, read_pth, require_torch, write_pth
from swin_ssl.convert.resize import bicubic_matrix, resize_grid, resize_pos_embed, resize_rel_pos_table

__all__ = [
    "DEFAULT_BACKBONE", "FORMAT", "IGNORED_BUFFERS", "MOBY_SLOTS", "TORCH_HINT", "ConversionError", "Report", "Slot",
    "bicubic_matrix", "build_backbone", "build_head", "detect_layout", "export_backbone", "export_slot",
    "export_state", "export_workdir", "guess_architecture", "import_checkpoint", "import_state", "init_variables",
    "layout_slots", "layout_slots_from_meta", "load_backbone", "load_backbone_from", "load_converted", "main",
    "read_pth", "require_torch", "resize_grid", "resize_pos_embed", "resize_rel_pos_table", "save_converted",
    "train_state_parts", "write_pth",
]
