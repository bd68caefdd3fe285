"""``vl convert``: checkpoints between this project's run directories and Hugging Face's BERT, LXMERT and
VisualBERT formats.

    vl convert --from-hf HF_DIR --out RUN     a Hugging Face directory -> a run directory of ours
    vl convert --from-hf HF_DIR --answers ANSWERS.json --out RUN
                                              an LXMERT VQA checkpoint -> a VQA run of ours
    vl convert RUN --to-hf HF_DIR             a run directory of ours -> a Hugging Face directory
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vl.errors import UserError


def _check_out_dir(path: Path, names: tuple[str, ...], force: bool, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} exists and is not a directory")
    existing = [name for name in names if (path / name).exists()]
    if existing and not force:
        raise UserError(f"{flag} {path} already holds {existing[0]}; pass --force to overwrite it")


def _carry_tokenizer(source: Path, out: Path) -> str:
    """Copy ``source``'s tokenizer (``vocab.txt`` + ``tokenizer_config.json``) into ``out``, both of them readable
    here and by ``transformers``; returns what to add to the summary line."""
    from vl.text.tokenizer import Tokenizer

    if not (source / "vocab.txt").is_file():
        return f"; {source} holds no vocab.txt, so no tokenizer was carried: pass --tokenizer where the result is used"
    Tokenizer.from_dir(source).save(out)
    return " and the tokenizer (vocab.txt, tokenizer_config.json)"


def _from_hf(args: argparse.Namespace) -> int:
    from vl.checkpoints.hf_bert import load_hf_bert_model
    from vl.checkpoints.hf_vl import LXMERT_KIND, VISUALBERT_KIND, load_hf_vl_model
    from vl.checkpoints.io import detect_checkpoint_kind
    from vl.checkpoints.vl_run import CONFIG_FILE, WEIGHTS_FILE, save_vl_run

    source, out = Path(args.from_hf), Path(args.out)
    kind = detect_checkpoint_kind(source)
    if kind == "vl-run":
        raise UserError(f"--from-hf {source} is a run directory of this project, not a Hugging Face checkpoint")
    _check_out_dir(out, (CONFIG_FILE, WEIGHTS_FILE), args.force, "--out")
    if args.answers is not None:
        from vl.checkpoints.hf_vqa import convert_hf_vqa

        count, parameters = convert_hf_vqa(source, args.answers, out, ignore_unknown=args.ignore_unknown)
        carried = _carry_tokenizer(source, out)
        print(f"wrote the VQA run {out} ({count} answers{carried}) from {kind[3:]} with its answer head "
              f"({parameters:,} parameters)")
        return 0
    if kind in (LXMERT_KIND, VISUALBERT_KIND):
        model = load_hf_vl_model(source, ignore_unknown=args.ignore_unknown)[0]
        what = f"{kind[3:]} ({model.cfg.fusion}, heads: {_heads(model)})"
    elif kind == "hf-bert":
        model = load_hf_bert_model(source, ignore_unknown=args.ignore_unknown)[0]
        what = "bert (text-only)"
    else:
        raise UserError(f"--from-hf {source}: checkpoint kind '{kind}' cannot be converted")
    save_vl_run(model, out)
    carried = _carry_tokenizer(source, out)
    print(f"wrote {out / WEIGHTS_FILE}, {out / CONFIG_FILE}{carried} from {what} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def _heads(model) -> str:
    heads = [name for name in ("mlm", "itm", "region", "answer") if getattr(model.heads, name) is not None]
    return ", ".join(heads) or "none"


def _to_hf(args: argparse.Namespace) -> int:
    from vl.checkpoints.hf_bert import export_hf_bert
    from vl.checkpoints.hf_vl import export_hf_vl
    from vl.checkpoints.vl_run import load_vl_run
    from vl.text.bert import BertPretrainingModel

    run, out = Path(args.run), Path(args.to_hf)
    _check_out_dir(out, ("config.json", "model.safetensors"), args.force, "--to-hf")
    model = load_vl_run(run)
    if isinstance(model, BertPretrainingModel):
        export_hf_bert(model, model.cfg, out)
        what = "BertForPreTraining"
    else:
        export_hf_vl(model, out)
        import json

        what = json.loads((out / "config.json").read_text())["architectures"][0]
    carried = _carry_tokenizer(run, out)
    print(f"wrote {out / 'model.safetensors'}, {out / 'config.json'}{carried} ({what})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    if args.from_hf is not None:
        if args.run is not None or args.to_hf is not None:
            raise UserError("use either '--from-hf HF_DIR --out RUN' or 'RUN --to-hf HF_DIR', not both")
        if args.out is None:
            raise UserError("--from-hf needs --out RUN")
        return _from_hf(args)
    if args.answers is not None:
        raise UserError("--answers goes with --from-hf (an LXMERT VQA checkpoint)")
    if args.run is None or args.to_hf is None:
        raise UserError("expected '--from-hf HF_DIR --out RUN' or 'RUN --to-hf HF_DIR'")
    if args.out is not None:
        raise UserError("--out goes with --from-hf; with RUN use --to-hf HF_DIR")
    return _to_hf(args)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert checkpoints to and from Hugging Face BERT, LXMERT and VisualBERT",
        description="Convert checkpoints between run directories of this project and Hugging Face's BERT, "
                    "LXMERT and VisualBERT formats.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="  vl convert --from-hf HF_DIR --out RUN\n"
               "  vl convert --from-hf LXMERT_VQA_DIR --answers ANSWERS.json --out VQA_RUN\n"
               "  vl convert RUN --to-hf HF_DIR",
    )
    parser.add_argument("run", nargs="?", metavar="RUN", help="a run directory of ours to export (with --to-hf)")
    parser.add_argument("--from-hf", metavar="HF_DIR",
                        help="a Hugging Face directory (config.json + model.safetensors or pytorch_model.bin)")
    parser.add_argument("--out", metavar="RUN", help="run directory to write (with --from-hf)")
    parser.add_argument("--answers", metavar="ANSWERS.json",
                        help="with --from-hf of an LXMERT VQA checkpoint: its answer list in logit order (a JSON "
                             "list, e.g. LXMERT's trainval_label2ans.json); writes a VQA run")
    parser.add_argument("--to-hf", metavar="HF_DIR", help="Hugging Face directory to write (with RUN)")
    parser.add_argument("--ignore-unknown", action="store_true",
                        help="with --from-hf: skip tensors that are not part of the pretraining model "
                             "(e.g. a fine-tuned task head) instead of failing")
    parser.add_argument("--force", action="store_true", help="overwrite existing weights in the output directory")
    parser.set_defaults(func=_convert)
