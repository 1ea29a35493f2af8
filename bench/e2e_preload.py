"""What the server of bench_e2e.py's row processes imports before it forks the first row: bench_e2e itself (its
environment settings: the NVML device check, Triton's interpreter on a CPU) and the libraries the rows use, each
failure printed rather than raised (bench_e2e._import_row_libraries), so that every row starts with them imported.

A module of its own because the forkserver's preload of "__main__" imports nothing on Python 3.11 and 3.12 (it looks
for the main script's path under a key the preparation data does not have): every row then imported transformers,
peft and pyreft itself, about 8 s of a 2-core CPU per row."""

import bench_e2e

bench_e2e._import_row_libraries()
