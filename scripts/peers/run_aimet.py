"""AIMET (aimet-torch 2.x) AdaRound with our scheme. Imported by ``worker.py`` inside the AIMET venv.

Scheme: per-channel asymmetric weights; per-tensor asymmetric activation quantizers at the INPUT of each
Conv/Linear only (an AIMET config file with ``is_input_quantized`` on Conv/Gemm and no
supergroups; every output quantizer it adds is removed from the sim); first conv and last linear at 8/8 bit; BN folded by ``aimet_torch.batch_norm_fold``. Ranges:
``--range-method`` is an AIMET quant scheme (``tf_enhanced``: SQNR-based range search, the default here; ``tf``:
min-max). AdaRound itself is AIMET's: weight-only, layer by layer in execution order, inputs from the model with
the already-rounded prefix, activation quantizers disabled during optimisation; then a QuantizationSimModel with the
frozen rounded weight encodings computes activation encodings on the same calibration images.
"""

from __future__ import annotations

import json
import time
from importlib.metadata import version as _dist_version
from pathlib import Path

import torch
from torch import nn

DEFAULT_RANGE = "tf_enhanced"
_CONFIG = {
    "defaults": {
        "ops": {"is_output_quantized": "True", "is_symmetric": "False"},  # False is refused by AIMET
        "params": {"is_quantized": "True", "is_symmetric": "False"},
        "strict_symmetric": "False",
        "unsigned_symmetric": "False",
        "per_channel_quantization": "True",
    },
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {"Conv": {"is_input_quantized": "True"}, "Gemm": {"is_input_quantized": "True"}},
    "supergroups": [],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}


def version() -> str:
    return _dist_version("aimet-torch")


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold every conv -> BN pair with AIMET's own folding (on a copy); every BN of the CIFAR ResNets follows a conv."""
    import copy

    from aimet_torch.batch_norm_fold import fold_all_batch_norms

    model = copy.deepcopy(model).eval()
    pairs = fold_all_batch_norms(model, input_shapes=(1, 3, 32, 32))
    remaining = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if remaining:
        raise RuntimeError(f"AIMET folded {len(pairs)} BatchNorms but left {remaining}")
    return model


def _compute_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def quantize(model: nn.Module, calib: torch.Tensor, args) -> tuple[nn.Module, dict]:
    """AdaRound ``model`` (BN already folded) and return the QuantizationSimModel's model plus run facts."""
    from aimet_torch.adaround import Adaround, AdaroundParameters
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.nn import BaseQuantizationMixin
    from aimet_torch.quantsim import QuantizationSimModel

    scheme = QuantScheme.from_str(args.range_method or DEFAULT_RANGE)
    # Parameter-free custom leaves (ShortcutA: subsample + zero-pad) carry no quantizer in our scheme.
    from aimet_torch.nn import QuantizationMixin

    custom_leaves = {type(m) for m in model.modules() if not list(m.children())
                     and not type(m).__module__.startswith("torch.") and not list(m.parameters())}
    for leaf_type in custom_leaves:
        QuantizationMixin.ignore(leaf_type)
    config = args.scratch / "aimet_config.json"
    config.write_text(json.dumps(_CONFIG, indent=2))
    batches = [calib[i : i + args.batch_size] for i in range(0, len(calib), args.batch_size)]
    dummy = calib[:1]
    layers = _compute_layers(model)
    first_last = [layers[0][1], layers[-1][1]]
    stages: dict[str, float] = {}

    start = time.perf_counter()
    params = AdaroundParameters(data_loader=batches, num_batches=len(batches),
                                default_num_iterations=args.iterations)
    ada_model = Adaround.apply_adaround(
        model, dummy, params, path=str(args.scratch), filename_prefix="adaround",
        default_param_bw=args.weight_bits,
        param_bw_override_list=[(m, args.first_last_bits) for m in first_last],
        default_quant_scheme=scheme, default_config_file=str(config))
    stages["adaround"] = time.perf_counter() - start

    start = time.perf_counter()
    sim = QuantizationSimModel(ada_model, dummy_input=dummy, quant_scheme=scheme,
                               default_output_bw=args.act_bits, default_param_bw=args.weight_bits,
                               config_file=str(config))
    qlayers = {n: m for n, m in sim.model.named_modules() if isinstance(m, BaseQuantizationMixin)}
    names = [n for n, _ in layers]
    for name, qm in qlayers.items():
        if name in names:
            q_in = qm.input_quantizers[0]
            if q_in is None or qm.param_quantizers["weight"] is None:
                raise RuntimeError(f"AIMET sim: {name} lacks an input or weight quantizer; scheme not applied")
            if name in (names[0], names[-1]):
                q_in.bitwidth = args.first_last_bits
                qm.param_quantizers["weight"].bitwidth = args.first_last_bits
        # Our scheme quantizes only the inputs of compute layers: drop anything else the config produced.
        if name not in names:
            qm.input_quantizers = nn.ModuleList([None for _ in qm.input_quantizers])
        qm.output_quantizers = nn.ModuleList([None for _ in qm.output_quantizers])
    missing = [n for n in names if n not in qlayers]
    if missing:
        raise RuntimeError(f"AIMET sim did not wrap {missing}")
    sim.set_and_freeze_param_encodings(str(Path(args.scratch) / "adaround.encodings"))

    def calibrate(m: nn.Module, _: object = None) -> None:
        for b in batches:
            m(b)

    sim.compute_encodings(calibrate)
    stages["activation_encodings"] = time.perf_counter() - start
    bits = {n: (qlayers[n].param_quantizers["weight"].bitwidth, qlayers[n].input_quantizers[0].bitwidth)
            for n in names}
    info = {
        "range_method": f"AIMET {scheme.name} (weights and activations)",
        "stage_seconds": stages,
        "scheme": "per-channel asym weights, per-tensor asym inputs of conv/linear, first/last 8/8, BN folded",
        "layer_bits": {n: list(b) for n, b in bits.items()},
        "adaround": {"reg_param": params.reg_param, "beta_range": list(params.beta_range),
                     "warm_start": params.warm_start, "num_batches": len(batches), "batch_size": args.batch_size},
    }
    return sim.model.eval(), info
