"""Test-only patches for `axolotl train` launches, loaded by Python at start-up in every process of a launch
whose PYTHONPATH starts with this folder. Each is off unless its variable is set; nothing in the plugin changes.

BNF_TEST_ADAPTER_SEED=<seed>: torch's generator is seeded with it just before PEFT creates the adapter. Axolotl
creates it with whatever state data loading left, which differs between launches (1 or 2 processes, micro-batch
sizes), so two runs meant to follow the same trajectory would start from different LoRA A matrices.

BNF_ENGINES_ON_CPU=1: make a CPU-only machine look like a GPU machine to accelerate, so that `axolotl train`
under torchrun takes accelerate's FSDP2 and DeepSpeed paths over gloo: the engines' real prepare code, on CPU
processes. What it changes, and why each is needed:
- accelerate's `PartialState._prepare_backend`: a launched process is "MULTI_GPU" on the gloo backend.
  accelerate only builds FSDP / DeepSpeed state on top of an accelerator's distributed type; on the CPU it
  would fall back to DDP (MULTI_CPU) and drop its FSDP plugin.
- `ACCELERATE_TORCH_DEVICE=cpu`: the state's device, so that accelerate never calls `torch.cuda.set_device`.
- `ParallelismConfig.build_device_mesh`: Axolotl asks for a "cuda" device mesh; it is built on "cpu".
- The plugin's CPU multi-process check (`processes.is_cpu_multiprocess_launch`) answers as on a GPU
  machine, where it is False: otherwise the plugin forms accelerate's CPU (DDP) state itself. Axolotl's
  CUDA peer-to-peer probe, which that path answers (`compat.answer_cuda_peer_query_without_gpus`; a CUDA build
  of torch without a driver raises), is answered here instead.
- DeepSpeed's accelerator is its CPU one (it is chosen so on a machine without GPUs); its `comm` is
  initialised by accelerate with the gloo backend chosen above.
"""
import os

if os.environ.get("BNF_TEST_ADAPTER_SEED"):
    import peft
    import peft.mapping_func
    import torch

    _get_peft_model = peft.get_peft_model

    def _seeded_get_peft_model(*args, **kwargs):
        torch.manual_seed(int(os.environ["BNF_TEST_ADAPTER_SEED"]))
        return _get_peft_model(*args, **kwargs)

    peft.get_peft_model = peft.mapping_func.get_peft_model = _seeded_get_peft_model

if os.environ.get("BNF_ENGINES_ON_CPU") == "1":
    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")

    import accelerate.parallelism_config as _parallelism
    import accelerate.state as _state
    from accelerate.utils import DistributedType

    _prepare_backend = _state.PartialState._prepare_backend

    def _gpu_like_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if int(os.environ.get("LOCAL_RANK", -1)) != -1 and not cpu:
            return "gloo", DistributedType.MULTI_GPU
        return _prepare_backend(self, cpu, sagemaker_dp, backend)

    _state.PartialState._prepare_backend = _gpu_like_backend

    _build_device_mesh = _parallelism.ParallelismConfig.build_device_mesh
    _parallelism.ParallelismConfig.build_device_mesh = lambda self, device_type: _build_device_mesh(self, "cpu")

    import axolotl_bnf_plugin.processes as _processes
    from axolotl_bnf_plugin.compat import answer_cuda_peer_query_without_gpus

    _processes.is_cpu_multiprocess_launch = lambda: False
    answer_cuda_peer_query_without_gpus()  # what the plugin's CPU launch path does, skipped with it just above

    if os.environ.get("BNF_ENGINES_REPORT"):
        # Print what accelerate prepared (how many parameters FSDP2 or ZeRO-3 shards), for the test to check.
        import sys

        import accelerate.accelerator as _accelerator
        import torch

        _prepare = _accelerator.Accelerator.prepare

        def _reporting_prepare(self, *args, **kwargs):
            out = _prepare(self, *args, **kwargs)
            from torch.distributed.tensor import DTensor

            for obj in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(obj, torch.nn.Module):
                    params = list(obj.parameters())
                    print(f"[engines-on-cpu] prepared {type(obj).__name__} under {self.state.distributed_type}: "
                          f"{len(params)} parameters, {sum(isinstance(p, DTensor) for p in params)} DTensor, "
                          f"{sum(hasattr(p, 'ds_id') for p in params)} ZeRO-3", file=sys.stderr, flush=True)
            return out

        _accelerator.Accelerator.prepare = _reporting_prepare
