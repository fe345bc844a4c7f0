"""What selection costs next to the recovery it serves, exhaustive vs sampled scoring, at the paper's largest setting.

Cost model (forward-token passes; a training token costs ``--train-factor`` forward passes: forward plus
backward, 3 by the usual 1 + 2 rule):

- random (the default method): nothing;
- exhaustive scoring (method paser): 2 models x N records x L tokens (``rank: ies`` or ``score`` need nothing
  more); paser's default ranking (``rank: ifd``) adds IFD's two passes of the pruned model (prompt + response, then the
  response alone): N x (2L - prompt) (mode ``exhaustive+ifd``);
- sampled scoring: 2 x (pilot + oversample x B) x L, with pilot = sum over K clusters of
  max(pilot_min, pilot x size) and B the budget (embedding with MiniLM, 22M parameters, is counted too, and
  is negligible next to a 7B or 70B model); with ``--confirm-tokens N`` the confirmation pass reads only
  the prompt (``--prompt-tokens``, an assumption: set it for your data) and the first N response tokens, so a
  confirmed record costs min(L, prompt + N) (``bench/confirm_tokens.py`` measures how well that ranks);
- self-distilled targets (``--targets original``: the original answers each selected prompt once): B x L
  forward tokens with a KV cache (prompt prefill plus one pass per generated token, the answer assumed as long
  as the reference), added to every mode as ``MODE+original-targets``; generation is memory-bound, so its wall
  time per token is worse than scoring's on a GPU (measure it: ``train_log.json``'s ``targets``);
- recovery: train_factor x epochs x B x L; with ``--loss kd`` (or mix) the original runs beside the student as
  its teacher, one more forward pass per trained token: (train_factor + 1) x epochs x B x L (the default,
  ``loss: auto``, is kd whenever the original is known: ``--loss kd`` models the default recipe, whose
  selection, random, costs nothing).

With ``--measured TRAIN_LOG.json SELECTION.json`` (a recovery's train_log.json and an exhaustive
selection's selection.json from the same machine) the ratio is also given in wall time, from the measured
training tokens/s and scoring tokens/s of the embedded model (and, for ``--targets original``, the measured
generation tokens/s of that train_log's targets, which is far below what the FLOP count suggests on a CPU).
Prints one JSON line per mode.
"""

import argparse
import json
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=2_585_615, help="LaMini-instruction: 2.58M records")
    parser.add_argument("--tokens", type=float, default=300, help="tokens per record")
    parser.add_argument("--budget", type=float, default=0.04, help="the paper's budget at this scale: 4%")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument("--pilot", type=float, default=0.02)
    parser.add_argument("--pilot-min", type=int, default=16)
    parser.add_argument("--oversample", type=float, default=2.0)
    parser.add_argument("--confirm-tokens", type=int, default=None,
                        help="confirm on the first N response tokens only (default: the whole record)")
    parser.add_argument("--prompt-tokens", type=float, default=50, help="prompt tokens per record (assumed)")
    parser.add_argument("--params", type=float, default=70e9, help="model parameters (FLOPs ~ 2 x params per token)")
    parser.add_argument("--train-factor", type=float, default=3.0)
    parser.add_argument("--targets", choices=["reference", "original"], default="reference",
                        help="original: add the original model's answers to the selected prompts (self-distillation)")
    parser.add_argument("--loss", choices=["nll", "kd", "mix"], default="nll",
                        help="kd / mix: the recovery also runs the original (teacher) forward on every trained token")
    parser.add_argument("--measured", nargs=2, metavar=("TRAIN_LOG", "SELECTION"), default=None)
    args = parser.parse_args()

    n, length = args.records, args.tokens
    budget = args.budget * n
    per_cluster = n / args.clusters
    pilot = args.clusters * min(per_cluster, max(args.pilot_min, args.pilot * per_cluster))
    embed = n * length * 2 * 22e6 / (2 * args.params)  # MiniLM's cost in forward-token passes of the big model
    teacher = 0.0 if args.loss == "nll" else 1.0
    recovery = (args.train_factor + teacher) * args.epochs * budget * length
    confirm_length = length if args.confirm_tokens is None else min(length, args.prompt_tokens + args.confirm_tokens)
    modes = {"random": 0.0, "exhaustive": 2 * n * length + embed,
             "exhaustive+ifd": 2 * n * length + n * (2 * length - args.prompt_tokens) + embed,
             "sampled": 2 * (pilot * length + args.oversample * budget * confirm_length) + embed}
    if args.targets == "original":
        modes = {f"{mode}+original-targets": passes + budget * length for mode, passes in modes.items()}
    measured = None
    if args.measured:
        train_log, selection = (json.loads(Path(p).read_text()) for p in args.measured)
        train_tps = train_log["tokens_per_s"]
        score_tps = selection["cost"]["model_forward_tokens"] / selection["timings"]["score"]  # model-token passes
        measured = {"train_tokens_per_s": train_tps, "score_model_tokens_per_s": round(score_tps, 1)}
        targets = train_log.get("targets") or {}
        if targets.get("generated_tokens") and targets.get("generation_seconds"):  # measured generation speed
            measured["generated_tokens_per_s"] = round(targets["generated_tokens"] / targets["generation_seconds"], 1)
    for mode, passes in modes.items():
        row = {"mode": mode, "records": n, "budget": int(budget), "scored_records": int(
                   0 if mode.startswith("random") else n if mode.startswith("exhaustive")
                   else pilot + args.oversample * budget),
               "loss": args.loss, "selection_forward_tokens": passes, "recovery_forward_token_equivalents": recovery,
               "selection_over_recovery": round(passes / recovery, 3)}
        if mode == "sampled" and args.confirm_tokens is not None:
            row.update(confirm_tokens=args.confirm_tokens, assumed_prompt_tokens=args.prompt_tokens)
        if measured:
            generation = budget * length if mode.endswith("+original-targets") else 0.0
            if generation and "generated_tokens_per_s" not in measured:
                raise SystemExit("--targets original with --measured needs the train_log.json of a run that generated "
                                 "its original targets (not one served from the cache)")
            seconds_select = ((passes - generation) / measured["score_model_tokens_per_s"]
                              + (generation / measured["generated_tokens_per_s"] if generation else 0.0))
            seconds_train = args.epochs * budget * length / measured["train_tokens_per_s"]
            row.update(measured, selection_over_recovery_wall=round(seconds_select / seconds_train, 3))
        print(json.dumps(row))


if __name__ == "__main__":
    main()
