"""W&B lineage: the exported predictor and the evaluation report are Artifacts, and evaluation takes an
artifact reference as `ckpt_path`, recorded as the run's input, so the evaluation run links to the
training run that logged the predictor.

    training (a wandb logger):  artifact `predictor-<source model>-<mode>[-h<lookahead>]` (type "model"):
                                predictor.safetensors + metrics.json, metadata = the export meta
                                (`artifact=<name>` in conf/train.yaml names it otherwise)
    evaluation (wandb.enabled): artifact `evaluation-<predictor or baselines>` (type "evaluation"):
                                report.json, report.md and the plots
    python evaluate.py ckpt_path=wandb-artifact://[<entity>/<project>/]<name>[:<version or alias>]

An artifact reference is fetched with `run.use_artifact(...).download()`, which needs W&B online
(`WANDB_MODE=online`); offline runs store the artifacts they log and upload them on `wandb sync`.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

ARTIFACT_PREFIX = "wandb-artifact://"
_REF = re.compile(r"(?:([\w.-]+)/([\w.-]+)/)?([\w.-]+)(?::([\w.-]+))?")


def is_artifact_ref(value) -> bool:
    return isinstance(value, str) and value.startswith(ARTIFACT_PREFIX)


def parse_artifact_ref(ref: str) -> str:
    """"wandb-artifact://[entity/project/]name[:version]" -> the name `use_artifact` takes (":latest" when
    no version is given)."""
    m = _REF.fullmatch(ref[len(ARTIFACT_PREFIX) :]) if is_artifact_ref(ref) else None
    if not m:
        raise ValueError(f"ckpt_path={ref!r}: an artifact reference reads "
                         f"{ARTIFACT_PREFIX}[<entity>/<project>/]<name>[:<version or alias>]")  # fmt: skip
    entity, project, name, version = m.groups()
    return (f"{entity}/{project}/" if entity else "") + f"{name}:{version or 'latest'}"


def slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", str(text)).strip("-.") or "unknown"


def predictor_artifact_name(meta: dict) -> str:
    """`predictor-<source model>-<mode>[-h<lookahead>]`; the source model's last two path parts."""
    source = "-".join(Path(str(meta.get("source_model") or "unknown")).parts[-2:])
    h = f"-h{meta['lookahead']}" if meta.get("mode") == "layer_ahead" and meta.get("lookahead") else ""
    return slug(f"predictor-{source}-{meta.get('mode', 'unknown')}{h}")


def log_predictor_artifact(run, path: Path, meta: dict, name: str | None = None, extra_files=()):
    """Log the exported predictor (and `extra_files`) as a "model" artifact of `run`; returns it."""
    import wandb

    from predictor.jsonable import to_jsonable

    art = wandb.Artifact(name or predictor_artifact_name(meta), type="model", metadata=to_jsonable(meta),
                         description=f"moe-prefetch predictor for {meta.get('source_model')}")  # fmt: skip
    for f in (path, *extra_files):
        art.add_file(str(f))
    run.log_artifact(art)
    # a reference is read from the server: an offline run's, once synced, online
    when = ", offline: once synced (`wandb sync`), evaluate it online with" if getattr(run, "offline", False) else \
        "; evaluate it with"
    log.info("W&B artifact %s (model)%s ckpt_path=%s%s:latest", art.name, when, ARTIFACT_PREFIX, art.name)
    return art


def report_artifact_name(ckpt_path, traces) -> str:
    """`evaluation-<predictor>`: the artifact's name for a reference, `<run dir>-<file stem>` for a file;
    `evaluation-baselines-<trace set>` without a predictor."""
    if not ckpt_path:
        return slug(f"evaluation-baselines-{Path(str(traces)).name}")
    if is_artifact_ref(ckpt_path):
        return slug("evaluation-" + parse_artifact_ref(ckpt_path).split("/")[-1].split(":")[0])
    p = Path(str(ckpt_path)).resolve()  # a relative checkpoints/last.ckpt names its run too
    run_dir = p.parent.parent if p.parent.name == "checkpoints" else p.parent  # <run>/checkpoints/last.ckpt
    return slug(f"evaluation-{run_dir.name}-{p.stem}")


def log_report_artifact(run, files: dict, name: str, metadata: dict | None = None):
    """Log report.json, report.md and the plots as an "evaluation" artifact of `run`; returns it."""
    import wandb

    art = wandb.Artifact(slug(name), type="evaluation", metadata=metadata or {})
    for f in (files["json"], files["md"], *files.get("plots", [])):
        art.add_file(str(f))
    run.log_artifact(art)
    return art


def use_predictor_artifact(run, ref: str, root: Path, mode: str = "online") -> Path:
    """Fetch the predictor behind an artifact reference into `root`, recorded as an input of `run` (None:
    fetched through the public API, without lineage, unless W&B's `mode` is offline) -> the predictor file
    inside it."""
    name = parse_artifact_ref(ref)
    offline = (f"ckpt_path={ref}: W&B runs offline (wandb.mode / WANDB_MODE), and an artifact reference needs it "
               f"online: set WANDB_MODE=online, or fetch it first (`wandb artifact get {name}`) and pass the file")
    if run is None and str(mode) in ("offline", "disabled", "dryrun"):  # the public API would go to the network
        raise ValueError(offline)
    try:
        if run is None:
            import wandb

            log.warning("ckpt_path=%s with wandb.enabled=false: fetched, but no run records it as an input", ref)
            art = wandb.Api().artifact(name, type="model")
        else:
            art = run.use_artifact(name, type="model")
    except TypeError as e:  # wandb: "Cannot use artifact when in offline mode."
        raise ValueError(f"{offline} ({e})") from e
    folder = Path(art.download(root=str(root)))
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.ckpt"))
    if len(found) != 1:
        raise FileNotFoundError(f"ckpt_path={ref}: expected one .safetensors (or .ckpt) file in the artifact, "
                                f"found {[p.name for p in folder.iterdir()]}")  # fmt: skip
    log.info("predictor from W&B artifact %s: %s", name, found[0])
    return found[0]


@contextmanager
def eval_run(cfg):
    """The evaluation's W&B run (None when `wandb.enabled` is false), started before the predictor is
    loaded so that an artifact `ckpt_path` is recorded as its input; finished on exit (failed on an error)."""
    if not cfg.wandb.enabled:
        yield None
        return
    import wandb
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    if is_artifact_ref(config.get("ckpt_path")):  # wandb.init would act on a "wandb-artifact://" config value
        config["ckpt_path"] = "artifact:" + parse_artifact_ref(config["ckpt_path"])  # itself (fetch, fail offline)
    run = wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, dir=str(cfg.paths.output_dir),
                     job_type="evaluate", tags=list(cfg.tags), config=config)  # fmt: skip
    try:
        yield run
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
