"""A local stand-in for the Hugging Face Hub (tests run with HF_HUB_OFFLINE=1, no network).

`HfApi.create_repo` and `HfApi.upload_folder` are replaced by writers into a directory laid out as the HF
cache (`<type>s--<owner>--<name>/snapshots/<commit>/...` and `refs/main`), and the cache is pointed there.
Everything that reads a repo then goes through huggingface_hub's real offline path: `hf_hub_download`
and `snapshot_download` find the pushed files in the cache, exactly as after a download."""

import shutil
import uuid
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace


class LocalHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.commits: list[dict] = []

    def repo_dir(self, repo_id: str, repo_type: str | None) -> Path:
        return self.root / f"{repo_type or 'model'}s--{repo_id.replace('/', '--')}"

    def snapshot(self, repo_id: str, repo_type: str | None = None, revision: str = "main") -> Path:
        d = self.repo_dir(repo_id, repo_type)
        return d / "snapshots" / (d / "refs" / revision).read_text().strip()

    def install(self, monkeypatch) -> "LocalHub":
        import huggingface_hub
        from huggingface_hub import constants

        hub = self

        def create_repo(api, repo_id, *, repo_type=None, exist_ok=False, **_):
            d = hub.repo_dir(repo_id, repo_type)
            if d.exists() and not exist_ok:
                raise FileExistsError(repo_id)
            (d / "refs").mkdir(parents=True, exist_ok=True)
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(api, *, repo_id, folder_path, repo_type=None, revision=None, delete_patterns=None,
                          commit_message=None, **_):
            d, ref = hub.repo_dir(repo_id, repo_type), revision or "main"
            new = d / "snapshots" / uuid.uuid4().hex  # a 32-hex commit id
            old_ref = d / "refs" / ref
            if old_ref.exists():  # a commit keeps the files it does not touch, except those delete_patterns match
                patterns = [delete_patterns] if isinstance(delete_patterns, str) else list(delete_patterns or [])
                shutil.copytree(d / "snapshots" / old_ref.read_text().strip(), new,
                                ignore=lambda _, names: [n for n in names if any(fnmatch(n, p) for p in patterns)])
            new.mkdir(parents=True, exist_ok=True)
            for f in Path(folder_path).rglob("*"):
                if f.is_file():
                    (new / f.relative_to(folder_path)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(f, new / f.relative_to(folder_path))  # follows symlinks, as an upload reads
            old_ref.write_text(new.name)
            hub.commits.append({"repo_id": repo_id, "repo_type": repo_type, "message": commit_message,
                                "files": sorted(p.name for p in new.iterdir())})
            return f"https://huggingface.co/{repo_id}/commit/{new.name}"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(self.root))
        return self
