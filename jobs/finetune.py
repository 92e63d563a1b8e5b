"""`ray job submit` entrypoint: run one job YAML on the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/finetune.py jobs/examples/lora.yaml \
        [--set output.dir=/shared/runs/x] [--resume]

Inside a Ray job, $RAY_ADDRESS points at the cluster, so the Ray Train workers are placed on
its nodes. Use an absolute (shared) path or a URI for output.dir: the job's working_dir is a
temporary copy that Ray deletes. Any failure (invalid job, a worker, a reward function, the
final save or upload) exits non-zero, so `ray job status` reports FAILED.
"""

import sys

# Ray puts the submitted working_dir first on PYTHONPATH, so its raylib wins over an installed one
from raylib.cli import main
from raylib.job_entry import argv_with_job_file

if __name__ == "__main__":
    # `--job-env VAR`: the job YAML is in $VAR (how `raylib submit` sends it)
    main(["train", *argv_with_job_file(sys.argv[1:])], prog_name="jobs/finetune.py")
