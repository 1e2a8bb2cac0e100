"""What a tuning run shows while it runs (a progress bar) and says when it is interrupted."""

from __future__ import annotations

from kgen.tune import study as st


class Progress:
    """A tqdm bar over all trials of all workloads (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="trial", dynamic_ncols=True)

    def set(self, done: int, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)
            self.bar.update(max(0, done - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def interrupted_message(settings, workload, study, results) -> str:
    """What an interrupted run recorded: finished workloads, and the cut one's measured trials."""
    measured = st.budget_trials(study) if study is not None else []
    best = st.best_complete(study) if study is not None else None
    parts = [f"interrupted while tuning {workload.key}"]
    if results:
        parts.append(f"{len(results)} workload(s) finished and recorded in {settings.store.best_path}")
    parts.append(f"{workload.key}: {len(measured)} of {settings.trials} trials measured and kept in "
                 f"{settings.storage_location} and {settings.store.trials_path}"
                 + (f", best so far {best.value:.5g} ms ({st.trial_info(best).get('config_key')})"
                    if best is not None else "")
                 + "; its best.json entry was not written")
    parts.append("continue with the same command and --resume")
    return "; ".join(parts)
