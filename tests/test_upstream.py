"""Every private (or unexported) upstream API the project relies on, each with the check that fails loudly when the
library changes its shape, and the tests that exercise the behaviour built on it. The list is this module: a reach
that is not checked here is a defect.

| upstream | what we use | where | why no public API | behaviour also covered by |
|---|---|---|---|---|
| transformers | `config._attn_implementation` (read) | acceleration.apply | the effective attention after `set_attn_implementation`; no public getter | test_speed |
| transformers | `integrations.sdpa_attention.sdpa_attention_forward` | acceleration.packed_attention | sdpa's own path when ours steps aside (decoding) | test_speed (generate equal to sdpa) |
| transformers | `masking_utils.ALL_MASK_ATTENTION_FUNCTIONS`, `sdpa_mask` | acceleration.register_packed_attention | a registered attention needs a mask function; `AttentionInterface` has no mask twin | test_speed |
| peft | `tuners.lora.layer.Linear` internals: `lora_variant`, `_cast_input_dtype`, `scaling`, `lora_dropout`, `merged`, `disable_adapters`, `fan_in_fan_out` | acceleration._fused_lora_forward | the fused forward re-does `Linear.forward` in one addmm | test_speed (loss and gradients equal) |
| transformers | `GenerationMixin._get_logits_processor(generation_config, input_ids_seq_length, device)` | generation.Generator.start, grpo.Rollout.sample | the decoder picks tokens with the processors generate() would use for the same settings; no public builder | test_decoding (a lone row equals generate()), test_chat |
| transformers | `cache_utils.DynamicLayer` and its `keys`/`values` tensors | decoding.Decoder (batching rows in one cache) | rows joining and leaving a batch pad, concatenate and select cache tensors; `DynamicCache` has no public merge | test_decoding |
| torch | `_inductor.aoti_compile_and_package`, `_inductor.aoti_load_package`, the loaded model's `get_constant_fqns`/`load_constants(..., user_managed=True)`, the config `aot_inductor.package_constants_in_so`; `_inductor.cpp_builder.get_cpp_compiler()` and `_C._GLIBCXX_USE_CXX11_ABI` (compiling the batch's products operator as inductor compiles its kernels) | decode_step (build, FastStep.ready) | AOTInductor's documented entry points live under `torch._inductor`; a package without weights, handed the live model's tensors, has no other API | test_decode_step |
| torch | `Tensor._version` (read) | decode_step.FastStep._refresh_blocks | a weight written in place since its copy in blocks (an optimizer's step); tensors have no public write counter | test_decode_step (a weight changed in place answers as eager) |
| torch | `nn.Module._non_persistent_buffers_set` | decode_step.baked_buffers | which buffers are computed rather than saved (they are compiled into the package); no public accessor | test_decode_step (a model's rotary frequencies reach the build) |
| transformers | `cache_utils.DynamicLayer.lazy_initialization(keys, values)`; a `DynamicCache`'s `layers` replaced by our own `DynamicLayer` subclass (the cache hands each layer's `update` its new key and value) | decode_step.StepModule, BufferLayer | a cache over buffers with room, written in place, for the exported step; transformers' `StaticCache` attends over its whole length | test_decode_step |
| huggingface_hub | `serialization._base.parse_size_to_int` | merging | the size parser `split_torch_state_dict_into_shards` uses, not re-exported | test_merge |
| safetensors | `torch._getdtype` | weights.ModelWeights | a header's dtype string as a torch dtype (merge and the GGUF export plan from headers) | test_merge, test_gguf |
| torch | `ops.mkldnn._is_mkldnn_bf16_supported` | precision.cpu_has_native_bf16 | oneDNN's own answer to "native bf16 here" | test_precision |
| torch | the weights-only unpickler's error texts ("Weights only load failed", "GLOBAL x ... is blocked" and kin) | safeload._unpickler_error | the refused global is named only in the message | test_convert (malicious pickles) |
| trl | `DPOTrainer._prepare_dataset(dataset, processing_class, args, dataset_name)` | preference.PairDPOTrainer | TRL 1.16 re-tokenizes every dataset; the override passes our pre-tokenized pair rows through | test_preference (rows equal TRL's tokenization; loss equal to plain DPOTrainer) |
| trl | `KTOTrainer._prepare_dataset(dataset, processing_class, args, dataset_name)`, its `calculate_KL`, and the `KL_completion_ids` column its collator reads | preference.RatedKTOTrainer | TRL 1.16 extracts and tokenizes every dataset; the override passes our pre-tokenized rated rows through and adds the KL completions as TRL's preparation does | test_kto (loss, KL and rewards equal to plain KTOTrainer) |
| trl | `trainer.utils.FusedCausalLMOutput` and the `fused_lm_head=True` forward its trainers call | acceleration.pack_pairs | packed pairs answer DPOTrainer's fused-head forward in its own output type | test_preference (packed outputs and gradients equal the padded forward) |
| trl | `GRPOTrainer._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations)` -> (completion_ids, logprobs); `trainer.generation_config`, `generation_kwargs`, `eos_token_ids`, `num_generations(_eval)` (read) | grpo.Rollout | `grpo.fast_rollouts: false` samples by TRL's own generation from our prompt ids; the public `rollout_func` hook hands us prompts, not TRL's generator | test_grpo (a run with fast_rollouts off; loss equal to plain GRPOTrainer) |
| Python | `_compat_pickle` name tables | safeload._py3_name | protocol-2 pickles name Python 2 modules | test_convert |
| peft | `utils.other.get_pattern_key(pattern_keys, key_to_match)` | merging (a module's rank and alpha from `rank_pattern`/`alpha_pattern`: `per_module`) | the rule PEFT itself applies to pick a pattern for a module; not exported | test_merge |
| transformers | `integrations.gguf.gguf_tokenizer_mapping.GGUF_PRE_TOKENIZER_SPLITS` | gguf_export.pre_tokenizer_name | llama.cpp's names for pre-tokenizer regexes as transformers' GGUF reader knows them; no public table | test_gguf |
| transformers | `modeling_gguf_pytorch_utils.tqdm` (swapped for a silent one while verify loads the GGUF) | gguf_export.verify | its progress bar is a plain tqdm that ignores transformers' own switch | test_gguf |
| numpy | `_core.multiarray._reconstruct`, `_core.multiarray.scalar` | safeload._numpy_globals | the globals numpy arrays and scalars pickle as (mmengine's log history); numpy >= 2 moved them from `core` | test_convert |
| trl | `experimental.orpo.ORPOConfig`, `ORPOTrainer` | preference | TRL 1.x moved ORPO out of its stable namespace | test_preference |
| torch | `_check(cond)` | decode_step.BufferLayer | bounds on an unbacked size while exporting (torch.export's documented way to state them) | test_decode_step |
| transformers | `Trainer._prepare_inputs(inputs)` | bench/preference.py (one timed DPO step) | moves a collated batch to the device as a training step does; no public twin | test_bench (the bench's quick run) |
| uvicorn | `protocols.http.h11_impl.H11Protocol` subclassed: its `connection_made`/`data_received`/`connection_lost`, and `conn` (h11's `their_state`), `transport`, `loop`, `client`, `logger` | server.transport.ReadTimeoutH11Protocol | uvicorn has a keep-alive timeout only, no hook for a deadline on a request's arrival | test_serve (stalled connections closed) |

Training's run behaviour (checkpoints staged and renamed, recipe in each, rotation, token counts) uses public
pieces only: `TrainingArguments.output_dir`, `include_num_input_tokens_seen`, `TrainerCallback.on_save`,
`TensorBoardCallback(tb_writer)`.
"""
import inspect
import pickle
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_attention_implementation_is_read_from_the_config(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from common import acceleration

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.set_attn_implementation(acceleration.register_packed_attention())
    assert model.config._attn_implementation == acceleration.PACKED_ATTENTION


def test_sdpa_forward_and_mask_registry_keep_their_shape():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    params = list(inspect.signature(sdpa_attention_forward).parameters)
    assert params[:8] == ["module", "query", "key", "value", "attention_mask", "dropout", "scaling", "is_causal"]
    assert callable(sdpa_mask) and callable(ALL_MASK_ATTENTION_FUNCTIONS.register)


def test_peft_lora_linear_has_what_the_fused_forward_reads():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):
            return self.proj(x)

    layer = get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj"])).base_model.model.proj
    assert type(layer) is Linear
    for name in ("lora_variant", "scaling", "lora_dropout", "merged", "disable_adapters", "fan_in_fan_out",
                 "active_adapters", "base_layer", "lora_A", "lora_B"):
        assert hasattr(layer, name), name
    assert isinstance(layer.lora_variant, dict) and isinstance(layer.scaling, dict)
    x = torch.ones(2, 8)
    assert layer._cast_input_dtype(x, torch.float32).dtype == torch.float32
    assert list(inspect.signature(Linear.forward).parameters)[:2] == ["self", "x"]


def test_hub_size_parser_and_safetensors_dtype_names():
    from huggingface_hub.serialization._base import parse_size_to_int
    from safetensors.torch import _getdtype

    assert parse_size_to_int("2GB") == 2 * 10**9 and parse_size_to_int("200MB") == 200 * 10**6
    assert _getdtype("F32") is torch.float32 and _getdtype("BF16") is torch.bfloat16 and _getdtype("F16") is torch.float16


def test_mkldnn_bf16_query_answers_a_bool():
    """precision.cpu_has_native_bf16 asks oneDNN; the op must exist, take no argument and answer a bool (a tensor or
    None would make every CPU look native, or none)."""
    answer = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert type(answer) is bool


def test_peft_pattern_key_picks_the_pattern_merging_reads():
    from peft.utils.other import get_pattern_key

    assert list(inspect.signature(get_pattern_key).parameters) == ["pattern_keys", "key_to_match"]
    patterns = ["q_proj", "model.layers.1.v_proj"]
    assert get_pattern_key(patterns, "model.layers.1.v_proj") == "model.layers.1.v_proj"
    assert get_pattern_key(patterns, "model.layers.0.self_attn.q_proj") == "q_proj"


def test_gguf_reader_tables_and_progress_bar():
    import transformers.modeling_gguf_pytorch_utils as loader
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    assert isinstance(GGUF_PRE_TOKENIZER_SPLITS, dict) and "llama3" in GGUF_PRE_TOKENIZER_SPLITS
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in GGUF_PRE_TOKENIZER_SPLITS.items())
    # verify swaps the module's tqdm: it must be the name the loader calls
    assert hasattr(loader, "tqdm") and "tqdm(" in inspect.getsource(loader)


def test_numpy_pickle_globals_live_where_safeload_names_them():
    import numpy as np

    from common.safeload import _numpy_globals

    assert callable(np._core.multiarray._reconstruct) and callable(np._core.multiarray.scalar)
    reduced = np.arange(3).__reduce__()
    assert reduced[0] is np._core.multiarray._reconstruct  # what an array pickles as
    assert np.float64(1.5).__reduce__()[0] is np._core.multiarray.scalar
    assert (np._core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct") in _numpy_globals()


def test_trl_orpo_lives_in_experimental():
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    # preference.py hands the recipe's orpo_lambda to ORPO as `beta` (ORPO's lambda is TRL's beta)
    assert {"beta", "max_length", "remove_unused_columns"} <= set(ORPOConfig.__dataclass_fields__)
    assert issubclass(ORPOTrainer, __import__("transformers").Trainer)


def test_torch_check_and_trainer_prepare_inputs():
    from transformers import Trainer

    assert list(inspect.signature(torch._check).parameters)[:1] == ["cond"]
    try:
        torch._check(False, lambda: "refused")
    except RuntimeError as e:
        assert "refused" in str(e)
    else:
        raise AssertionError("torch._check(False) passed")
    assert list(inspect.signature(Trainer._prepare_inputs).parameters) == ["self", "inputs"]


def test_weights_only_unpickler_still_names_the_refused_global(tmp_path):
    """safeload turns this message into "refused to load: its pickle asks for `posix.system`"."""
    import os

    from common.safeload import _REFUSED

    class Payload:
        def __reduce__(self):
            return os.system, ("true",)

    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    try:
        torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
    else:
        raise AssertionError("torch's weights-only unpickler loaded a global it should refuse")
    assert "Weights only load failed" in message
    assert any(p.search(message) for p in _REFUSED), message


def test_compat_pickle_tables():
    import _compat_pickle

    assert _compat_pickle.NAME_MAPPING[("__builtin__", "xrange")] == ("builtins", "range")
    assert _compat_pickle.IMPORT_MAPPING["__builtin__"] == "builtins"


def test_trl_dpo_dataset_hook_and_fused_head_output_keep_their_shape():
    import dataclasses

    from trl import DPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput

    assert list(inspect.signature(DPOTrainer._prepare_dataset).parameters) == [
        "self", "dataset", "processing_class", "args", "dataset_name"]
    fields = {f.name for f in dataclasses.fields(FusedCausalLMOutput)}
    assert {"loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask",
            "aux_loss"} <= fields


def test_trl_grpo_generation_keeps_its_shape():
    from trl import GRPOTrainer

    params = list(inspect.signature(GRPOTrainer._generate_single_turn).parameters)
    assert params[:5] == ["self", "prompt_ids", "images", "multimodal_fields", "num_generations"]
    assert "rollout_func" in inspect.signature(GRPOTrainer.__init__).parameters


def test_generate_builds_logits_processors_and_dynamic_layers_hold_tensors(tiny_model_dir):
    from transformers import AutoModelForCausalLM, DynamicCache, GenerationConfig
    from transformers.cache_utils import DynamicLayer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=5, repetition_penalty=1.2)
    processors = model._get_logits_processor(config, input_ids_seq_length=3, device=model.device)
    names = [type(p).__name__ for p in processors]
    assert {"RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper"} <= set(names)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True)
    assert all(type(layer) is DynamicLayer for layer in cache.layers)
    assert cache.layers[0].keys.shape[0] == 1 and cache.layers[0].keys.shape[2] == 3


def test_aot_inductor_entry_points_keep_their_shape():
    import torch._inductor
    import torch._inductor.config as inductor_config
    from torch._inductor.package.package import AOTICompiledModel
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    assert callable(torch._inductor.aoti_compile_and_package) and callable(torch._inductor.aoti_load_package)
    assert hasattr(inductor_config.aot_inductor, "package_constants_in_so")
    from torch._inductor.cpp_builder import get_cpp_compiler

    assert isinstance(get_cpp_compiler(), str) and isinstance(torch._C._GLIBCXX_USE_CXX11_ABI, bool)
    assert {"constants_map", "check_full_update", "user_managed"} <= set(
        inspect.signature(AOTICompiledModel.load_constants).parameters)
    assert callable(AOTICompiledModel.get_constant_fqns)
    weight = torch.zeros(2)
    version = weight._version
    weight.add_(1)
    assert weight._version == version + 1
    assert list(inspect.signature(DynamicLayer.lazy_initialization).parameters)[1:3] == ["key_states", "value_states"]
    assert "self.layers[layer_idx].update(" in inspect.getsource(DynamicCache.update)
    module = torch.nn.Module()
    module.register_buffer("computed", torch.ones(1), persistent=False)
    assert module._non_persistent_buffers_set == {"computed"}


def test_uvicorn_h11_protocol_has_what_the_read_deadline_uses():
    """The deadline subclass on a connection that sends nothing: uvicorn's own constructor and connection_made set
    the attributes it reads, and the deadline closes the transport."""
    import asyncio

    import h11
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from common.server.transport import read_timeout_protocol

    class Transport(asyncio.Transport):
        def __init__(self):
            super().__init__()
            self.closed = asyncio.Event()

        def get_extra_info(self, name, default=None):
            return default

        def is_closing(self):
            return self.closed.is_set()

        def close(self):
            self.closed.set()

    async def stalled():
        protocol = read_timeout_protocol(0.01)(config=Config(app=None), server_state=ServerState(), app_state={},
                                               _loop=asyncio.get_running_loop())
        transport = Transport()
        protocol.connection_made(transport)
        assert protocol.conn.their_state is h11.IDLE and protocol.transport is transport and protocol.deadline
        await asyncio.wait_for(transport.closed.wait(), timeout=30)  # closed by the deadline, or the test fails
        assert protocol.deadline is None

    asyncio.run(stalled())


def test_trl_kto_dataset_hook_and_kl_column_keep_their_shape():
    from trl import KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    params = list(inspect.signature(KTOTrainer._prepare_dataset).parameters)
    assert params == ["self", "dataset", "processing_class", "args", "dataset_name"]
    assert "self.calculate_KL = " in inspect.getsource(KTOTrainer.__init__)
    batch = DataCollatorForUnpairedPreference(pad_token_id=0)(
        [{"prompt_ids": [1], "completion_ids": [2], "KL_completion_ids": [3], "label": True}])
    assert batch["KL_input_ids"].tolist() == [[1, 3]] and batch["completion_mask"].tolist() == [[0, 1]]
