#!/usr/bin/env python
"""Quantization-aware training on adaptively selected coresets (ACS), end to end.

    python recipes/run_acs.py                                   # embedded offline demo (digits)
    python recipes/run_acs.py recipes/configs/digits_demo.yaml --fraction 0.3   # a config plus overrides
    python recipes/run_acs.py --model_name resnet18 --dataset_name uoft-cs/cifar100 ...  # flags only
    accelerate launch --num_processes 8 recipes/run_acs.py recipes/configs/imagenet_resnet18_w4a4_acs10.yaml

Arguments: ModelArguments, DataArguments, RunArguments (acs_hf.run.arguments), acs_hf.QuantConfig,
acs_hf.ACSArguments and transformers' TrainingArguments, from one YAML/JSON file and/or the command line
(the command line wins).
Without a config file, flags apply on top of recipes/configs/digits_demo.yaml (the embedded demo),
unless they name a dataset (--dataset_name, --train_dir).
"""

import json
import logging
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from acs_hf import ACSArguments, QuantConfig
from acs_hf.run.arguments import DataArguments, ModelArguments, RunArguments
from acs_hf.run.recipe import default_output_dir, run_acs
from acs_hf.utils.upstream import parser_destinations

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "digits_demo.yaml"


def parse(argv: list[str]):
    """Parse ``[config.yaml] [--flag value ...]`` into the six argument dataclasses.

    The base values come from the config file when one is given first; otherwise from the embedded
    demo config, unless a data source (--dataset_name, --train_dir) is given: a real dataset starts
    from the dataclass defaults rather than inheriting the demo's 32-pixel, from-scratch settings.
    """
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, QuantConfig, ACSArguments, TrainingArguments, RunArguments)
    )
    config = None
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        config, argv = Path(argv[0]), argv[1:]
    elif not any(a.split("=")[0] in ("--dataset_name", "--train_dir") for a in argv):
        config = DEFAULT_CONFIG
    if config is not None:
        if not config.is_file():
            parser.error(f"config file {config} does not exist")
        values = yaml.safe_load(config.read_text()) or {}
        known = parser_destinations(parser)
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"unknown keys in {config}: {', '.join(unknown)}")
        parser.set_defaults(**values)
        logging.getLogger(__name__).info("base settings: %s", config)
    args = parser.parse_args_into_dataclasses(args=argv)
    model_args, data_args, quant_args, acs_args, training_args, _ = args
    if training_args.output_dir == "trainer_output":  # transformers' placeholder: use a descriptive name
        training_args.output_dir = default_output_dir(model_args, quant_args, acs_args)
    return args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse(sys.argv[1:] if argv is None else argv)
    summary = run_acs(*args)
    if "checkpoint" in summary:  # main process
        m = summary["metrics"]
        print("\n" + "=" * 72)
        print(
            f"quantized top-1 {m.get('eval_accuracy', float('nan')):.4f}  (FP teacher "
            f"{m.get('fp_eval_accuracy', float('nan')):.4f}), "
            f"checkpoint {summary['compression']:.1f}x smaller than fp32"
        )
        for key in ("checkpoint", "model_card", "selection_plot", "selection_log", "onnx", "hub_url", "hub_error"):
            if summary.get(key):
                print(f"{key:15s} {summary[key]}")
        print("metrics        ", json.dumps({k: round(v, 4) for k, v in m.items() if isinstance(v, float)}))
        print(f"load it         import acs_hf; pipeline('image-classification', model={summary['checkpoint']!r})")
        print("=" * 72)
    if summary.get("hub_error"):
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
