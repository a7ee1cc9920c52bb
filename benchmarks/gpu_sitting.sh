#!/usr/bin/env bash
# One GPU sitting, scripted: the checks and measurements the open issues need, in priority
# order, each stage under its own time limit so that one slow stage cannot eat the others.
# A device call may run 10 minutes and a session has ~15 minutes of device time in all
# (machine start included), so one call's stages are held to SITTING_SECONDS (default 570).
#
#   here (with network):  bash benchmarks/gpu_sitting.sh prepare
#       downloads pure wheels the GPU machine lacks (pyyaml, matplotlib and its deps, for its
#       Python 3.12; a setuptools the build installs only if the machine's is older than
#       setup.py needs) into .whl/ (ignored; carry it: carry [".whl"]). For DALI also run
#       `bash ../shared/device/dali-wheels.sh` (.dali/p1 .. p5 and install.sh, ~60 MB each).
#   there:                bash benchmarks/gpu_sitting.sh run [STAGE ...]
#       STAGE: build tests tests-ops ops ops-ncu ops-tiles step memory memory-teacher
#       memory-partial memory-compiled step-imagenet step-imagenet-compiled step-compiled-default
#       step-compiled data methods reduced-memory placements gather (default: build tests ops
#       ops-tiles step memory step-imagenet, in that order), each under its own limit and all
#       under SITTING_SECONDS.
#       Wheels and DALI parts carried in a call are kept under /tmp
#       for the later calls on the same warm machine; DALI is installed once all five parts
#       have come (one part a call: docs/gpu_checklist.md has the call-by-call plan).
#       Logs (<stage>.log), result records (results/) and summary.txt (a line per stage, also on
#       stdout) are written under /tmp/sitting and packed into $OUT/sitting.tar.gz.00, .01, ...
#       (15 MiB parts) after every stage: at most 8 files of 16 MiB come back from a device
#       call. benchmarks/import_sitting.py files them here (or unpack by hand,
#       `cat sitting.tar.gz.* | tar -xz`, and copy the records
#       you report into benchmarks/results/, its autotune/ files into .autotune/ (ignored;
#       carry it next time: inductor's max-autotune timings for that card, see run()), and its
#       compile-cache.tar.* beside the archive, when a call sent them, into .compile-cache/
#       (ignored; carry it in the next sitting's first call: the kernels compiled so far, see
#       pack_compile_cache)).
set -uo pipefail
cd "$(dirname "$0")/.."

# what the trainer and figures need beyond the machine's torch/numpy/pillow/scikit-learn, and
# pytest-xdist for the gpu tests (most of their time is compiling kernels, on one core without it)
WHEELS=(pyyaml matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six
        pytest-xdist execnet)

prepare() {
  set -e
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
  # setup.py stops on a setuptools older than it needs (pyproject's SPDX license): one to
  # install there if the machine's is older (stage_build)
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "setuptools>=$MIN_SETUPTOOLS"
  du -sh .whl
}

export MIN_SETUPTOOLS=77  # setup.py's; exported: each stage runs in a shell of its own

stage_build() {
  local major="import setuptools as s, sys; major = int(s.__version__.split('.')[0])"
  if ! python3 -c "$major; sys.exit(major < $MIN_SETUPTOOLS)"; then
    echo "the machine's setuptools is older than $MIN_SETUPTOOLS: the one in .whl goes first"
    python3 -m pip install -q --no-deps --no-index --find-links .whl --target /tmp/sitting-site \
      "setuptools>=$MIN_SETUPTOOLS" || return 1
  fi
  python3 -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
  python3 -c "import mpl_fast.ops._extension as e; assert e.cuda_built(), 'no CUDA'; print('extension built with CUDA')" &&
    return 0
  # what the failed import had to work with, for the next sitting
  local so; so=$(ls mpl_fast/_C*.so)
  readelf -d "$so" | grep -E "NEEDED|PATH"; ldd "$so" | grep -E "cuda|torch|c10|stdc"
  return 1
}

# TRITON_INTERPRET=0: conftest turns the interpreter on unless told otherwise, and the gpu tests
# are there to run the compiled kernels; -v logs each test as it ends, so a cut-off run still says
# which passed. With pytest-xdist (carried in .whl) TEST_WORKERS processes (default 8 of the
# machine's 16 cores) share the tests: each test's kernels compile on the CPU, one at a time
# within a process, and the GPU waits on that more than on the tests' own work; timeout stops the
# workers with the stage (they stay in its process group)
test_workers() {
  python3 -c "import xdist" 2>/dev/null && [ "${TEST_WORKERS:-8}" -gt 1 ] &&
    echo "-n ${TEST_WORKERS:-8}"
}

stage_tests() {
  TRITON_INTERPRET=0 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider $(test_workers) tests/
}

# the gpu tests of the fused loss ops alone (compiled kernels against float64, every dtype), for a
# sitting that changed the kernels but has no time for the whole gpu suite
stage_tests_ops() {
  TRITON_INTERPRET=0 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider $(test_workers) \
    tests/test_loss_ops.py
}

# --kernels: where each call's GPU time goes (our kernel against the small ones around it: the
# mean's sum, the backward's scale), for the 1000-class cross-entropy and UDA that stay under 70%
# of bandwidth while pseudo_labels, one kernel, reaches 77-82%
stage_ops() {
  mpl-fast bench ops --kernels --out "$DIR/results"
}

# Nsight Compute on our kernels at the shapes #3's bandwidth target is set at (the cross-entropy
# and UDA at 34-67%): achieved occupancy, warp stall reasons, memory throughput, per kernel, the
# small ones around ours included; the shipped tile and the pipelined ones (persistent programs
# at 1000 classes, chunks in flight at 32000), and at 1000 classes the register cap of 40 (25
# programs an SM instead of 18 for the cross-entropy).
# Needs ncu on the machine (not in ../shared/device/README.md's list: the stage says so if absent)
stage_ops_ncu() {
  local ncu
  ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null \
    | head -n 1)
  if [ -z "$ncu" ]; then
    echo "no ncu on this machine"
    return 1
  fi
  "$ncu" --profile-from-start off --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
    mpl-fast bench ops --profiler-range --shapes 15360x1000 --dtypes bfloat16 \
      --tiles 256:4096:8:512,256:4096:8:512:r2,256:4096:8:512:m40 &&
    "$ncu" --profile-from-start off --section SpeedOfLight --section Occupancy \
      --section WarpStateStats \
      mpl-fast bench ops --profiler-range --shapes 4096x32000 --dtypes bfloat16 \
      --tiles 256:4096:8:512,256:4096:8:512:s3
}

# our kernels' tile (ELEMENTS:MAX_BLOCK:MAX_WARPS:PER_WARP[:lanes][:sN][:rN][:mN],
# kernels/softmax_common.py), swept at the shapes the bandwidth target is set at (#3). The third
# sitting (H200, 2026-11-26) chose the shipped 256:4096:8:512 (16 elements a thread; 10 classes: 16
# rows, one warp; 1000: one row, two warps; 32000: 4096-column chunks, 8 warps) over 1024:4096:8
# with 8 a thread (15-17% less time at 1000 classes in bf16), and per-row over per-lane statistics
# at 32000. What is left to try around it: at 10 classes 8 and 32 rows a warp, and 16 rows over 2
# warps; at 1000 one row a warp, two rows over two warps, and the earlier four warps a row; at 32000
# chunks of 4096 over 4 warps and a whole 32768 row over 32 (it spills:
# tests/compile_kernels_for_gpu.py --tile shows how much; a streamed row is read twice, a whole one
# once), and a streamed row's chunks software-pipelined, 2 and 3 in flight (:s2, :s3; the third
# sitting's 32000-class kernels took 45-72% of bandwidth with one chunk in flight a program); at 10
# and 1000 classes, one-tile rows by persistent programs with 2 and 3 tiles in flight (:r2, :r3; the
# 1000-class kernels took about the same time whatever bytes they moved: latency, not bandwidth),
# and with at most 40 or 32 registers a thread (:m40, :m32, and :r2:m40; uncapped, the 1000-class
# bf16 cross-entropy with its gradient takes 55 registers, so an SM holds 18 of its programs, 36 of
# 64 warps, where pseudo_labels at 32 fills all 32 program slots; capped, it spills 8 bytes a
# thread, UDA 40 at :m40 and 144 at :m32), and at 32000 L2 eviction hints on a streamed row's two
# passes, alone and with two chunks in flight (:e, :s2:e; the rows in flight pass the L2 with the
# rows written, so a row's second read may come from memory again: kernels/softmax_common.py),
# and fewer rows in flight for that second read to find in L2: 8192-column chunks over 16 warps
# (2 programs an SM instead of 4-6: 264 rows on 132 SMs, 17 MB of bf16 rows for the
# cross-entropy and 34 for UDA, against 34 and 84 MB shipped) and over 32 (1-2 programs: 8-17
# and 17 MB), with about the shipped tile's bytes in flight an SM (16-32 KiB), and the first with :e.
# The launch each tile made at each C is in its record.
stage_ops_tiles() {
  mpl-fast bench ops --shapes 15360x10,15360x1000 --no-compile \
    --tiles 256:4096:8:512,256:4096:8:512:r2,256:4096:8:512:r3,256:4096:8:512:m40,256:4096:8:512:m32,256:4096:8:512:r2:m40,128:4096:8:512,512:4096:8:512,256:4096:8:128,1024:4096:8:1024,2048:4096:8:1024,1024:4096:8:256 \
    --out "$DIR/results" &&
    mpl-fast bench ops --shapes 4096x32000 --no-compile \
      --tiles 256:4096:8:512,256:4096:8:512:e,256:8192:16:512,256:8192:32:256,256:4096:8:512:s2,256:4096:8:512:s2:e,256:8192:16:512:e,256:4096:8:512:s3,256:2048:4:512:s3,256:4096:4:512,32768:32768:32:1024 \
      --out "$DIR/results"
}

# the step (#7), with the gradient-free weak view, that with CE_old from the joint forward (the
# earlier default: what the labeled-only CE_old saves on this card), with cuDNN's algorithm
# search (a global switch: the floor beside it gets it too), and ours not graphed beside the
# eager reference (the trainer's default, train.cuda_graph=false: never measured on a GPU)
stage_step() {
  mpl-fast bench step --model wrn28_2 --no-compiled --out "$DIR/results" &&
    mpl-fast bench step --model wrn28_2 --weak-no-grad --no-reference --no-compiled \
      --out "$DIR/results" &&
    mpl-fast bench step --model wrn28_2 --weak-no-grad --ce-old-forward joint --no-reference \
      --no-compiled --out "$DIR/results" &&
    mpl-fast bench step --model wrn28_2 --weak-no-grad --cudnn-benchmark --no-reference \
      --no-compiled --out "$DIR/results" &&
    mpl-fast bench step --model wrn28_2 --no-graph --no-compiled --out "$DIR/results"
}

# the ImageNet-shaped step (#7; #6 compares the data pipeline's rate with what it consumes)
stage_step_imagenet() {
  mpl-fast bench step --model resnet50 --image-size 224 --batch-size 32 --mu 4 \
      --num-classes 1000 --no-compiled --steps 20 --warmup 5 --out "$DIR/results" &&
    mpl-fast bench step --model resnet50 --image-size 224 --batch-size 32 --mu 4 \
      --num-classes 1000 --weak-no-grad --no-reference --no-compiled --steps 20 --warmup 5 \
      --out "$DIR/results" &&
    mpl-fast bench step --model resnet50 --image-size 224 --batch-size 32 --mu 4 \
      --num-classes 1000 --weak-no-grad --ce-old-forward joint --no-reference --no-compiled \
      --steps 20 --warmup 5 --out "$DIR/results"
}

# the ImageNet-shaped step with both networks compiled (default mode), ours with the weak view
# without gradient, against the reference compiled the same way (#7's ResNet-50 targets: the
# H200 measured 86.2 ms for ours uncompiled, 1.18x the eager reference). cuDNN's benchmark mode
# for every variant alike, as a user tuning ResNet-50 would set it: it times each convolution's
# algorithms once (ResNet-50 has some twenty shapes; WRN-28-2's step gained 1.7% on the H200).
# Then ours with the weak view in the joint forward, the step a ResNet-50 run trains with by
# default (the weak view apart changes what a BatchNorm teacher learns: docs/cifar10.md), and
# that step with the weak view's rows outside autograd (--weak-no-grad joint: the joint
# forward's values and BN statistics for the forward apart's counted work; on the CPU it took
# the step from 1076 to 950-980 ms, the forward apart's 844-869: how much here?), and the weak
# view apart normalised with the other views' statistics (--weak-no-grad shared: the forward
# apart's work, and what it costs to record and apply them)
stage_step_imagenet_compiled() {
  mpl-fast bench step --model resnet50 --image-size 224 --batch-size 32 --mu 4 \
    --num-classes 1000 --compile default --weak-no-grad --reference-compile default \
    --cudnn-benchmark --steps 20 --warmup 5 --out "$DIR/results" &&
    mpl-fast bench step --model resnet50 --image-size 224 --batch-size 32 --mu 4 \
      --num-classes 1000 --compile default --no-reference --no-compiled --cudnn-benchmark \
      --steps 20 --warmup 5 --out "$DIR/results" &&
    mpl-fast bench step --model resnet50 --image-size 224 --batch-size 32 --mu 4 \
      --num-classes 1000 --compile default --weak-no-grad joint --no-reference --no-compiled \
      --cudnn-benchmark --steps 20 --warmup 5 --out "$DIR/results" &&
    mpl-fast bench step --model resnet50 --image-size 224 --batch-size 32 --mu 4 \
      --num-classes 1000 --compile default --weak-no-grad shared --no-reference --no-compiled \
      --cudnn-benchmark --steps 20 --warmup 5 --out "$DIR/results"
}

need_dali() {
  python3 -c "import nvidia.dali" || { echo "no DALI: carry the five .dali parts first"; return 1; }
}

# the DALI GPU pipeline (#6): its gpu tests, then throughput on CIFAR-10 at the WRN-28-2 step's
# batch when it was carried (a call of its own), and on ImageNet-sized synthetic JPEGs written
# there (about a minute on 16 cores) at the ResNet-50 step's batch. The third sitting (H200,
# 2026-11-26) timed 13 placements on CIFAR-10 (the fastest: decoded once, 4 unlabeled pipelines,
# 4 steps a run, 40.6k images/s, now cifar10_4k_short's) and found 2 pipelines with 4 steps a run
# fastest at 224 px (16.0k); with --parts and all of them the stage outlasted 230 s. Now: the
# defaults against the preset's settings and their neighbours (RandAugment's per-sample routing
# runs in one thread a pipeline: pipelines side by side are what helps, and steps a run once they
# are).
stage_data() {
  need_dali || return 1
  TRITON_INTERPRET=0 python3 -m pytest -v -rfE -p no:cacheprovider \
    tests/test_gpu_step.py -k dali || return 1
  if [ -d "$CIFAR/train" ]; then
    mpl-fast bench data --root "$CIFAR/train" --device gpu --batch-size 64 --mu 7 \
      --variant decode=once,pipelines=4,steps_per_run=4 \
      --variant decode=once,pipelines=4,steps_per_run=8 \
      --variant decode=once,pipelines=8,steps_per_run=4 \
      --variant decode=once,augment=cpu,pipelines=8,threads=2,steps_per_run=4 \
      --out "$DIR/results" || return 1
  fi
  mpl-fast bench data --synthetic 8192 --root /tmp/synth --device gpu --batch-size 32 --mu 4 \
    --variant pipelines=2 --variant pipelines=2,steps_per_run=4 \
    --variant pipelines=2,steps_per_run=8 --variant pipelines=2,steps_per_run=4,threads=4 \
    --out "$DIR/results"
}

# activation checkpointing (#7): time, activation memory and the largest batch, without, with
# both networks and with the teacher alone (it sees 1 + 2 mu of every 2 + 3 mu images: the
# H200 sitting measured both at 71% less activation memory for 34% more time; the teacher alone
# should land near 45% less for about 22% more, inside #7's target)
stage_memory() {
  mpl-fast bench step --model wrn28_2 --no-reference --no-compiled --max-batch \
      --out "$DIR/results" &&
    mpl-fast bench step --model wrn28_2 --checkpoint both --no-reference --no-compiled \
      --max-batch --out "$DIR/results" &&
    stage_memory_teacher
}

# Reduced MPL (mpl-fast logits, then model.teacher=reduced): one step's GPU memory with the
# large teacher in memory against its stored logits and a small MLP teacher, at #7's ResNet-50
# shape (both networks ResNet-50) and with a WRN-28-8 teacher beside a WRN-28-2 student
stage_reduced_memory() {
  python3 benchmarks/reduced_mpl_memory.py --device cuda --teacher resnet50 --student resnet50 \
      --image-size 224 --batch-size 32 --mu 4 --classes 1000 --out "$DIR/results" &&
    python3 benchmarks/reduced_mpl_memory.py --device cuda --teacher wrn28_8 --student wrn28_2 \
      --batch-size 64 --mu 7 --out "$DIR/results"
}

# the teacher alone (the last run of stage memory), to set beside the first sitting's runs
# without and with both
stage_memory_teacher() {
  mpl-fast bench step --model wrn28_2 --checkpoint teacher --no-reference --no-compiled \
    --max-batch --out "$DIR/results"
}

# the first 6 of WRN-28-2's 12 blocks in both networks: the early, high-resolution blocks hold
# the most activation per recomputed FLOP (on the CPU: 54% fewer saved bytes for 10% more FLOPs,
# against 85% for 20% with all twelve), so this should meet #7's checkpointing target where all
# blocks (+34% time) did not
stage_memory_partial() {
  mpl-fast bench step --model wrn28_2 --checkpoint both --checkpoint-blocks 6 --no-reference \
    --no-compiled --max-batch --out "$DIR/results"
}

# compiled networks with their blocks checkpointed (each checkpoint traced as dynamo's
# higher-order op since 2026-11-29; before, the blocks ran eagerly), the first 6 blocks then all
# 12, to set beside step-compiled-default's run without checkpointing (on the CPU: +14% time
# with all blocks, against +27% the old way)
stage_memory_compiled() {
  mpl-fast bench step --model wrn28_2 --compile default --checkpoint both --checkpoint-blocks 6 \
      --no-reference --no-compiled --out "$DIR/results" &&
    mpl-fast bench step --model wrn28_2 --compile default --checkpoint both --no-reference \
      --no-compiled --out "$DIR/results"
}

# both networks compiled in torch.compile's default mode, ours and the reference's: minutes of
# compilation instead of max-autotune's many (the issue's H100 figure for the graphed reference
# so compiled is 22.8 ms), with the gradient-free weak view on top, apart, in the joint
# forward and apart with the other views' statistics (--weak-no-grad joint and shared: what a
# BatchNorm teacher may train with)
stage_step_compiled_default() {
  mpl-fast bench step --model wrn28_2 --compile default --reference-compile default \
      --out "$DIR/results" &&
    mpl-fast bench step --model wrn28_2 --compile default --weak-no-grad --no-reference \
      --no-compiled --out "$DIR/results" &&
    mpl-fast bench step --model wrn28_2 --compile default --weak-no-grad joint --no-reference \
      --no-compiled --out "$DIR/results" &&
    mpl-fast bench step --model wrn28_2 --compile default --weak-no-grad shared --no-reference \
      --no-compiled --out "$DIR/results"
}

# #7's yardstick: the reference compiled with max-autotune-no-cudagraphs (bench step's default
# for --reference-compile), against ours at its best measured setting (compiled in the default
# mode, weak view without gradient: 14.6 ms on the H200), so only the reference autotunes; then,
# if the limit leaves time, ours under max-autotune too, the like-for-like comparison (the
# reference's kernels are timed by then: only ours' new shapes autotune, e.g. the teacher's
# separate 448-image weak forward)
stage_step_compiled() {
  mpl-fast bench step --model wrn28_2 --compile default --weak-no-grad --out "$DIR/results" &&
    mpl-fast bench step --model wrn28_2 --compile max-autotune-no-cudagraphs --weak-no-grad \
      --out "$DIR/results"
}

# #8: the CIFAR-10-4K runs named in METHODS (comma-separated, default mpl; one ~8-minute run fits
# a call; METHODS_ARGS adds options), each continued from its last.pt: the warm machine's own (RUNS, kept under /tmp), else
# the one carried in as runs/methods/<method> (a past sitting's, unpacked here). A run cut off by
# the limit has saved last.pt at its last multiple of train.checkpoint_every and resumes there.
# Needs DALI (the five parts) and CIFAR-10 (.data/cifar10.tgz, carried with a DALI part or alone).
stage_methods() {
  need_dali || return 1
  [ -d "$CIFAR/train" ] || { echo "no CIFAR-10: carry .data/cifar10.tgz first"; return 1; }
  local m
  for m in ${METHODS//,/ }; do
    if [ ! -f "$RUNS/$m/last.pt" ] && [ -f "runs/methods/$m/last.pt" ]; then
      mkdir -p "$RUNS" && cp -r "runs/methods/$m" "$RUNS/"
    fi
  done
  # METHODS_ARGS: more options for every method, e.g. "--set train.cuda_graph=true"
  # shellcheck disable=SC2086
  mpl-fast bench methods --set data.root="$CIFAR" --methods "$METHODS" --out "$RUNS" \
    --resume --results "$DIR/results" ${METHODS_ARGS:-}
}

# #8's run as it trains: the DALI stream and the graphed step share the GPU (the fourth sitting's
# MPL run: 19.8 ms a step against 14.6 for the step alone in bench step and 12.6 for a step's
# images from the stream alone in bench data). Short cifar10_4k_short runs with the speed
# settings under other data placements, 30 steps of each profiled once compiled: the window's
# wall ms a step (steady state, no compilation, no evaluation) and the host's time waiting for
# data, one line a placement in results/placements.jsonl. SITTING_PLACEMENTS: the names to run
# (comma-separated; default all, e.g. one again in a later call); PLACEMENT_ARGS: options added to
# every run after the stage's own (the CPU test's tiny runs)
stage_placements() {
  need_dali || return 1
  [ -d "$CIFAR/train" ] || { echo "no CIFAR-10: carry .data/cifar10.tgz first"; return 1; }
  # inside the function: a stage runs in a shell of its own that gets the functions alone
  local PLACEMENTS=("preset:"
    "augment-cpu:data.augment_device=cpu data.unlabeled_pipelines=8 data.num_threads=2"
    "pipelines-8:data.unlabeled_pipelines=8 data.num_threads=4"
    "steps-per-run-8:data.steps_per_run=8")
  local p name sets s run
  for p in "${PLACEMENTS[@]}"; do
    name=${p%%:*}
    [[ ",${SITTING_PLACEMENTS:-$name}," == *",$name,"* ]] || continue
    sets=()
    for s in ${p#*:}; do sets+=(--set "$s"); done
    run=${RUNS%/*}/placements/$name  # beside the methods' runs (/tmp/placements)
    mpl-fast train --config cifar10_4k_short --set data.root="$CIFAR" --steps 400 \
      --set train.eval_every=1000000 --set train.checkpoint_every=1000000 \
      --set train.finetune_steps=0 --set train.cuda_graph=true --set model.compile=default \
      --set mpl.teacher_weak_no_grad=true --profile 30 --set train.profile_from=350 \
      ${sets[@]+"${sets[@]}"} ${PLACEMENT_ARGS:-} --out "$run" --overwrite || return 1
    python3 benchmarks/placement_record.py "$name" "$run" "$DIR/results/placements.jsonl" \
      ${p#*:} || return 1
  done
}

# nothing to run: the call only brings carried parts (DALI, CIFAR-10) to the warm machine
stage_gather() {
  echo "gathered: DALI parts $(ls -d /tmp/dali-parts/p* 2>/dev/null | wc -l)/5, CIFAR-10" \
    "$([ -d "$CIFAR/train" ] && echo here || echo absent)"
}

declare -A LIMIT=([build]=90 [tests]=340 [tests-ops]=160 [ops]=180 [ops-ncu]=150 [step]=150 [step-compiled]=560 [memory]=300
  [step-imagenet]=150 [step-imagenet-compiled]=560 [ops-tiles]=240
  [data]=300 [memory-teacher]=120 [memory-partial]=120 [memory-compiled]=240 [step-compiled-default]=540
  [methods]=570 [gather]=20 [reduced-memory]=120 [placements]=300)
# All stages together stop by SITTING_SECONDS (default 570 s: inside one 600 s device call). A
# stage gets its own limit or what is left, whichever is less, so time a quick stage leaves over
# goes to the next; a stage left under 20 s is skipped.
SITTING_SECONDS=${SITTING_SECONDS:-570}

run() {
  : "${OUT:?set OUT to the folder that comes back}"
  local start=$SECONDS
  local stages=("$@")
  [ ${#stages[@]} -eq 0 ] && stages=(build tests ops ops-tiles step memory step-imagenet)
  for s in "${stages[@]}"; do
    if [ -z "${LIMIT[$s]:-}" ]; then
      echo "gpu_sitting: unknown stage $s (${!LIMIT[*]})" >&2
      return 2
    fi
  done
  DIR=${SITTING_DIR:-/tmp/sitting}
  rm -rf "$DIR" && mkdir -p "$DIR/results" "$OUT"
  # wheels carried in this call go to /tmp (kept while the machine stays warm) for later calls
  if [ -d .whl ] && ! python3 -c "import yaml, matplotlib, xdist" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-index --find-links .whl \
      --target /tmp/sitting-site "${WHEELS[@]}"
  fi
  export PYTHONPATH=/tmp/sitting-site${PYTHONPATH:+:$PYTHONPATH}
  # DALI comes in five parts, one a call (../shared/device/dali-wheels.sh): gather them in /tmp
  # and install once all five are there
  if compgen -G ".dali/p*" > /dev/null || [ -f .dali/install.sh ]; then
    mkdir -p /tmp/dali-parts && cp -r .dali/p* .dali/install.sh /tmp/dali-parts/ 2>/dev/null
    echo "DALI parts here: $(cd /tmp/dali-parts && ls -d p* 2>/dev/null | tr '\n' ' ')" \
      | tee "$DIR/dali.txt"
  fi
  if [ ! -d /tmp/dali-site/nvidia/dali ] && [ -f /tmp/dali-parts/install.sh ] &&
      [ "$(ls -d /tmp/dali-parts/p[1-5] 2>/dev/null | wc -l)" -eq 5 ]; then
    bash /tmp/dali-parts/install.sh 2>&1 | tail -n 3 | tee -a "$DIR/dali.txt"
  fi
  [ -d /tmp/dali-site/nvidia/dali ] && export PYTHONPATH=/tmp/dali-site:$PYTHONPATH
  export CIFAR=${SITTING_CIFAR:-/tmp/cifar10}
  # CIFAR-10 stays under /tmp for the later calls. Carry it packed (.data/cifar10.tgz, 19 MB:
  # `tar czf .data/cifar10.tgz -C ../shared/data/cifar10 train test`): the carry limit counts
  # its 60000 files as more than 64 MiB unpacked; a folder .data/cifar10 is taken too
  if [ ! -d "$CIFAR/train" ]; then
    rm -rf "$CIFAR.partial"
    if [ -f .data/cifar10.tgz ]; then
      mkdir -p "$CIFAR.partial" && tar -xzf .data/cifar10.tgz -C "$CIFAR.partial" &&
        mv "$CIFAR.partial" "$CIFAR"
    elif [ -d .data/cifar10/train ]; then
      cp -r .data/cifar10 "$CIFAR.partial" && mv "$CIFAR.partial" "$CIFAR"
    fi
  fi
  export RUNS=${SITTING_RUNS:-/tmp/methods} METHODS=${METHODS:-mpl}
  # inductor's max-autotune timings (a small JSON file per card and versions, written after each
  # kernel it autotunes): kept under /tmp while the machine stays warm, taken from .autotune/
  # when a past sitting's are carried in, and sent back in the archive (autotune/), so that the
  # compiled reference's minutes of benchmarking are paid once even when a call is cut off
  export TORCHINDUCTOR_CACHE_DIR=${SITTING_INDUCTOR_CACHE:-/tmp/sitting-inductor}
  mkdir -p "$TORCHINDUCTOR_CACHE_DIR/cache"
  if compgen -G ".autotune/*" > /dev/null; then
    local f
    for f in .autotune/*; do  # the warm machine's own file, if any, is the newer one
      [ -e "$TORCHINDUCTOR_CACHE_DIR/cache/${f##*/}" ] || cp "$f" "$TORCHINDUCTOR_CACHE_DIR/cache/"
    done
    echo "autotune timings carried in: $(ls .autotune | wc -l) file(s)" | tee "$DIR/autotune.txt"
  fi
  carry_compile_cache_in
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    | tee "$DIR/gpu.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$DIR/gpu.txt"
  export PYTHONUNBUFFERED=1  # logs up to the moment a stage is cut off
  for s in "${stages[@]}"; do
    local t0=$SECONDS kernels_before
    kernels_before=$(triton_kernels)
    local limit=$((SITTING_SECONDS - (t0 - start)))
    [ "$limit" -gt "${LIMIT[$s]}" ] && limit=${LIMIT[$s]}
    if [ "$limit" -lt 20 ]; then
      echo "stage $s: skipped, ${limit} s left of ${SITTING_SECONDS} s" | tee -a "$DIR/summary.txt"
      continue
    fi
    local fn="stage_${s//-/_}"
    # a shell of its own (so that timeout stops all of it), with every function defined
    timeout "$limit" bash -c "$(declare -f); DIR='$DIR' $fn" > "$DIR/$s.log" 2>&1
    local rc=$?
    local line="stage $s: rc=$rc in $((SECONDS - t0)) s (limit $limit s, Triton cache"
    line+=" +$(($(triton_kernels) - kernels_before))); $(tail -n 1 "$DIR/$s.log")"
    echo "$line" | tee -a "$DIR/summary.txt"
    pack
    [ "$s" = build ] && [ $rc -ne 0 ] && return 1
  done
  pack
  return 0
}

# Compiled kernels kept from one sitting to the next: Triton's cache (our loss kernels and the
# kernels inductor generates, each under a key of its source, the compiler and the target, sm_90
# on the H100 and the H200 alike) and inductor's (its FX graph and AOTAutograd caches, keyed to
# the card, torch and triton, so they hit on the same card only). A sitting spends minutes
# compiling (the gpu tests' hundreds of kernel variants, the compiled networks); a later one
# loads what did not change. Carried packed, one file each (the carry limit counts files):
# .compile-cache/triton.tar.gz and inductor.tar.gz, unpacked without overwriting what a warm
# machine already holds. A call whose stages compiled something sends them back beside its
# archive, as $OUT/compile-cache.tar.00, .01, ... (here: `cat compile-cache.tar.* | tar -x -C
# .compile-cache`), where they fit: at most COMPILE_CACHE_MIB (default 40, to travel beside
# .whl's 18 MiB within the 64 MiB a call carries) and within what the archive leaves of the
# 8 files and 64 MiB a call returns; inductor's are left out first.
export TRITON_CACHE_DIR=${SITTING_TRITON_CACHE:-/tmp/sitting-triton}

triton_kernels() {
  find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l
}

carry_compile_cache_in() {
  PACKED_CACHE=$DIR.compile-cache  # this call's packed caches, when it compiles anything
  rm -rf "$PACKED_CACHE"
  mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
  local kind dest
  for kind in triton inductor; do
    [ -f ".compile-cache/$kind.tar.gz" ] || continue
    dest=$TRITON_CACHE_DIR; [ $kind = inductor ] && dest=$TORCHINDUCTOR_CACHE_DIR
    tar -xzf ".compile-cache/$kind.tar.gz" -C "$dest" --skip-old-files ||
      echo "compile cache: $kind.tar.gz could not be unpacked" | tee -a "$DIR/compile-cache.txt"
  done
  COMPILE_CACHE_KERNELS=$(triton_kernels)
  echo "compile cache: $COMPILE_CACHE_KERNELS Triton entries here at the start" \
    | tee -a "$DIR/compile-cache.txt"
}

# both caches packed anew when a stage added Triton entries (gzip -1: a few seconds for
# hundreds of MB of cubins and IR); inductor's autotune timings travel apart (autotune/)
pack_compile_cache() {
  local now; now=$(triton_kernels)
  [ "$now" -gt "${COMPILE_CACHE_KERNELS:-0}" ] || return 0
  rm -rf "$PACKED_CACHE" && mkdir -p "$PACKED_CACHE"
  tar -cf - -C "$TRITON_CACHE_DIR" . | gzip -1 > "$PACKED_CACHE/triton.tar.gz"
  tar -cf - -C "$TORCHINDUCTOR_CACHE_DIR" --exclude=./cache . | gzip -1 \
    > "$PACKED_CACHE/inductor.tar.gz"
  COMPILE_CACHE_KERNELS=$now
}

# the packed caches into $OUT beside the archive's parts, both or Triton's alone, where they fit
send_compile_cache() {
  [ -d "$PACKED_CACHE" ] || return 0
  local part=$((15 * 2**20)) mib=$((2**20)) used=$1 files size names
  local room=$((63 * mib - used)) cap=$((${COMPILE_CACHE_MIB:-40} * mib))
  [ "$room" -gt "$cap" ] && room=$cap
  files=$((8 - $(ls "$OUT" | wc -l)))
  for names in "triton.tar.gz inductor.tar.gz" "triton.tar.gz"; do
    size=$(cd "$PACKED_CACHE" && cat $names | wc -c)
    if [ "$size" -le "$room" ] && [ $(((size + part - 1) / part)) -le "$files" ]; then
      (cd "$PACKED_CACHE" && tar -cf - $names) | split -b 15m -d - "$OUT/compile-cache.tar."
      echo "compile cache: $COMPILE_CACHE_KERNELS Triton entries; $names, $((size / mib)) MiB," \
        "sent back"
      return 0
    fi
  done
  echo "compile cache: Triton's alone $((size / mib)) MiB, more than the $((room / mib)) MiB" \
    "and $files files left beside the archive (COMPILE_CACHE_MIB ${COMPILE_CACHE_MIB:-40}):" \
    "not sent back"
}

# everything gathered so far into the archive that comes back, the autotune timings and the
# METHODS runs (without best.pt and finetuned.pt; last.pt, what a resume needs, only while a run is
# unfinished) included, in
# parts of 15 MiB (a device call returns files of 16 MiB at most, 64 MiB together): here,
# `cat sitting.tar.gz.* | tar -xz`
pack() {
  pack_compile_cache
  if compgen -G "$TORCHINDUCTOR_CACHE_DIR/cache/*" > /dev/null; then
    mkdir -p "$DIR/autotune" && cp "$TORCHINDUCTOR_CACHE_DIR"/cache/* "$DIR/autotune/"
  fi
  local staged runs=() m finished=()
  staged=$(mktemp -d)
  for m in ${METHODS//,/ }; do
    [ -d "$RUNS/$m" ] && runs+=("methods/$m")
    # a finished run (summary.json) needs no last.pt to resume: three of them (~30 MB each)
    # would pass the 64 MiB a call returns
    [ -f "$RUNS/$m/summary.json" ] && finished+=("--exclude=methods/$m/last.pt")
  done
  [ ${#runs[@]} -gt 0 ] && [ -f "$RUNS/methods.png" ] && runs+=("methods/methods.png")
  if [ ${#runs[@]} -gt 0 ]; then  # under methods/ in the archive, as runs/methods/ holds them
    ln -s "$RUNS" "$staged/methods"
    runs=(-C "$staged" "${runs[@]}")
  fi
  tar -czhf "$staged/all.tar.gz" --exclude=best.pt --exclude=finetuned.pt \
    ${finished[@]+"${finished[@]}"} -C "$DIR" . \
    ${runs[@]+"${runs[@]}"}
  rm -f "$OUT"/sitting.tar.gz.* "$OUT"/compile-cache.tar.*
  split -b 15m -d "$staged/all.tar.gz" "$OUT/sitting.tar.gz."
  send_compile_cache "$(wc -c < "$staged/all.tar.gz")"
  rm -rf "$staged"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash benchmarks/gpu_sitting.sh prepare | run [build tests tests-ops ops ops-ncu ops-tiles step memory memory-teacher memory-partial memory-compiled step-imagenet step-imagenet-compiled step-compiled-default step-compiled data methods reduced-memory placements gather]" >&2
     exit 2 ;;
esac
