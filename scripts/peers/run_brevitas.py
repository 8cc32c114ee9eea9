"""Brevitas learned round + bias correction with our scheme. Imported by ``worker.py`` inside the Brevitas venv.

Follows ``brevitas_examples/imagenet_classification/ptq/ptq_evaluate.py`` (layerwise backend): FX preprocessing
with BN merged and no graph equalization (our scheme has none), ``layerwise_quantize`` (quantizers at the INPUT of
each Conv/Linear), activation calibration, learned round (``hard_sigmoid``, regularised MSE, layer by layer,
Adam lr 1e-3: the example's defaults), then bias correction. Weights per-channel asymmetric, activations per-tensor
asymmetric, float scales; first conv and last linear at 8/8 bit. The example's own first/last rule only knows
1000-class heads, so the bit-width functions here pick the RGB-input conv and every Linear (the CIFAR ResNets
have one). Training runs in float32 on CPU (the example's float16 autocast is a GPU setting).
"""

from __future__ import annotations

import functools
import time
from argparse import Namespace
from importlib.metadata import version as _dist_version

import torch
from torch import nn

DEFAULT_RANGE = "mse"


def version() -> str:
    return _dist_version("brevitas")


def _is_first_or_last(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.in_channels == 3) or isinstance(module, nn.Linear)


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Brevitas' FX preprocessing: trace, merge BN into the convs; no equalization, no channel splitting."""
    from brevitas.graph.quantize import preprocess_for_quantize

    folded = preprocess_for_quantize(model, equalize_iters=0, merge_bn=True, channel_splitting_ratio=0.0)
    remaining = [n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if remaining:
        raise RuntimeError(f"Brevitas left BatchNorms unmerged: {remaining}")
    return folded.eval()


def _loader(calib: torch.Tensor, batch_size: int):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(calib, torch.zeros(len(calib), dtype=torch.long)), batch_size=batch_size,
                      shuffle=False)


def _tolerate_accelerate_hook_removal() -> None:
    """Let the learned-round trainer remove its offload hooks under accelerate >= 1.16.

    accelerate's ``remove_hook_from_module`` now reads a marker attribute, with a default, off every value in each
    module's ``__dict__``; Brevitas' quantizer injectors (classes) answer an unknown name with ``DependencyError``
    instead of ``AttributeError``, so the default never applies and the run crashed after the first block's input
    capture. The marker, set to False on the injectors' base class, is found by normal lookup first.
    """
    from brevitas.inject import ExtendedInjector

    # type.__setattr__: the injector metaclass forbids plain assignment
    type.__setattr__(ExtendedInjector, "_accelerate_added_attribute", False)


def quantize(model: nn.Module, calib: torch.Tensor, args) -> tuple[nn.Module, dict]:
    """Quantize, calibrate, learned-round and bias-correct ``model`` (BN already merged)."""
    import brevitas.nn as qnn
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas.inject import value
    from brevitas_examples.common.learned_round.learned_round_trainer import LearnedRoundTrainer, get_blocks
    from brevitas_examples.imagenet_classification.ptq import learned_round_utils as lru
    from brevitas_examples.imagenet_classification.ptq.ptq_common import (
        apply_bias_correction, calibrate, create_quant_maps)

    _tolerate_accelerate_hook_removal()
    method = args.range_method or DEFAULT_RANGE
    wbits, abits, flbits = args.weight_bits, args.act_bits, args.first_last_bits

    @value
    def weight_bit_width(module):
        return flbits if _is_first_or_last(module) else wbits

    @value
    def act_bit_width(module):
        return flbits if _is_first_or_last(module) else abits

    stages: dict[str, float] = {}
    start = time.perf_counter()
    _, layer_map, _, _ = create_quant_maps(
        dtype=torch.float32, device="cpu", bias_bit_width=32, weight_bit_width=weight_bit_width,
        weight_param_method=method, weight_scale_type="float_scale", weight_quant_type="asym",
        weight_quant_granularity="per_channel", weight_narrow_range=False, weight_quant_format="int",
        act_quant_format="int", act_bit_width=act_bit_width, act_scale_type="float_scale",
        act_scale_computation_type="static", act_param_method=method, act_quant_type="asym",
        act_quant_granularity="per_tensor", act_quant_percentile=99.999 if method == "stats" else None)
    qmodel = layerwise_quantize(model, compute_layer_map=layer_map).eval()
    loader = _loader(calib, args.batch_size)
    with torch.no_grad():  # some quantizers initialise on the first forward
        qmodel(calib[: args.batch_size])
    calibrate(loader, qmodel)
    stages["activation_calibration"] = time.perf_counter() - start

    start = time.perf_counter()
    lr_args = Namespace(learned_round="hard_sigmoid", learned_round_lr_scheduler=None, learned_round_lr=1e-3,
                        learned_round_loss="regularised_mse", learned_round_batch_size=args.batch_size,
                        learned_round_iters=args.iterations, learned_round_mode="layerwise")
    config = lru.parse_args_to_dataclass(lr_args)
    config.training_args.use_amp = False
    trainer = LearnedRoundTrainer(config=config)
    trainer.train(model=qmodel, model_forward=lru.vision_forward, block_forward=lru.vision_block_forward,
                  data_loader=loader, cache=lru.CacheVision(),
                  get_blocks_fn=functools.partial(get_blocks, block_check_fn=lru.is_layer), keep_gpu=True)
    stages["learned_round"] = time.perf_counter() - start

    start = time.perf_counter()
    apply_bias_correction(loader, qmodel)
    stages["bias_correction"] = time.perf_counter() - start

    bits = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear)):
            bits[name] = [int(m.weight_quant.bit_width()), int(m.input_quant.bit_width())]
    expected = {n: [flbits, flbits] if i in (0, len(bits) - 1) else [wbits, abits] for i, n in enumerate(bits)}
    if not bits or bits != expected:
        raise RuntimeError(f"Brevitas layer bits {bits} differ from the scheme {expected}")
    info = {
        "range_method": ("Brevitas MSE (weights and activations)" if method == "mse" else
                         "Brevitas stats (min-max weights, 99.999th-percentile activations)"),
        "stage_seconds": stages,
        "scheme": "per-channel asym weights, per-tensor asym inputs of conv/linear, first/last 8/8, BN merged",
        "layer_bits": bits,
        "learned_round": {"param": "hard_sigmoid", "loss": "regularised_mse", "lr": 1e-3, "mode": "layerwise",
                          "batch_size": args.batch_size, "amp": False},
    }
    return qmodel.eval(), info
