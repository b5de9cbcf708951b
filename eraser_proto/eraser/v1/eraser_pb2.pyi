import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class RegisterAdapterRequest(_message.Message):
    __slots__ = ("name", "base_model", "adapter_path", "dataset_path", "holdout_path", "verify")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PATH_FIELD_NUMBER: _ClassVar[int]
    DATASET_PATH_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_PATH_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_model: str
    adapter_path: str
    dataset_path: str
    holdout_path: str
    verify: str
    def __init__(self, name: _Optional[str] = ..., base_model: _Optional[str] = ..., adapter_path: _Optional[str] = ..., dataset_path: _Optional[str] = ..., holdout_path: _Optional[str] = ..., verify: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("name", "version", "base_model", "path", "rows", "dataset_path", "retained_versions", "adapter_sha256", "base_model_fingerprint", "updated_at", "replicas", "holdout_rows", "holdout_sha256", "verify")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DATASET_PATH_FIELD_NUMBER: _ClassVar[int]
    RETAINED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_ROWS_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_SHA256_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    base_model: str
    path: str
    rows: int
    dataset_path: str
    retained_versions: _containers.RepeatedScalarFieldContainer[int]
    adapter_sha256: str
    base_model_fingerprint: str
    updated_at: _timestamp_pb2.Timestamp
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    holdout_rows: int
    holdout_sha256: str
    verify: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., base_model: _Optional[str] = ..., path: _Optional[str] = ..., rows: _Optional[int] = ..., dataset_path: _Optional[str] = ..., retained_versions: _Optional[_Iterable[int]] = ..., adapter_sha256: _Optional[str] = ..., base_model_fingerprint: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., holdout_rows: _Optional[int] = ..., holdout_sha256: _Optional[str] = ..., verify: _Optional[str] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("replica", "served_path", "served_version", "current", "error")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SERVED_PATH_FIELD_NUMBER: _ClassVar[int]
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    replica: str
    served_path: str
    served_version: int
    current: bool
    error: str
    def __init__(self, replica: _Optional[str] = ..., served_path: _Optional[str] = ..., served_version: _Optional[int] = ..., current: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ModifyQuery(_message.Message):
    __slots__ = ("id", "prompt")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    id: str
    prompt: str
    def __init__(self, id: _Optional[str] = ..., prompt: _Optional[str] = ...) -> None: ...

class CorrectResponse(_message.Message):
    __slots__ = ("id", "response")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: str
    def __init__(self, id: _Optional[str] = ..., response: _Optional[str] = ...) -> None: ...

class EraseOptions(_message.Message):
    __slots__ = ("solver", "preset", "curvature", "damping", "objective", "tolerance", "max_iterations", "allow_unconverged", "curvature_rows", "deadline_seconds", "verify")
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_UNCONVERGED_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_ROWS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    solver: str
    preset: str
    curvature: str
    damping: float
    objective: str
    tolerance: float
    max_iterations: int
    allow_unconverged: bool
    curvature_rows: int
    deadline_seconds: float
    verify: str
    def __init__(self, solver: _Optional[str] = ..., preset: _Optional[str] = ..., curvature: _Optional[str] = ..., damping: _Optional[float] = ..., objective: _Optional[str] = ..., tolerance: _Optional[float] = ..., max_iterations: _Optional[int] = ..., allow_unconverged: _Optional[bool] = ..., curvature_rows: _Optional[int] = ..., deadline_seconds: _Optional[float] = ..., verify: _Optional[str] = ...) -> None: ...

class EraseRequest(_message.Message):
    __slots__ = ("adapter", "request_id", "remove_ids", "modify_queries", "correct_responses", "options")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REMOVE_IDS_FIELD_NUMBER: _ClassVar[int]
    MODIFY_QUERIES_FIELD_NUMBER: _ClassVar[int]
    CORRECT_RESPONSES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    request_id: str
    remove_ids: _containers.RepeatedScalarFieldContainer[str]
    modify_queries: _containers.RepeatedCompositeFieldContainer[ModifyQuery]
    correct_responses: _containers.RepeatedCompositeFieldContainer[CorrectResponse]
    options: EraseOptions
    def __init__(self, adapter: _Optional[str] = ..., request_id: _Optional[str] = ..., remove_ids: _Optional[_Iterable[str]] = ..., modify_queries: _Optional[_Iterable[_Union[ModifyQuery, _Mapping]]] = ..., correct_responses: _Optional[_Iterable[_Union[CorrectResponse, _Mapping]]] = ..., options: _Optional[_Union[EraseOptions, _Mapping]] = ...) -> None: ...

class EraseReport(_message.Message):
    __slots__ = ("solver", "preset", "curvature", "damping", "objective", "iterations", "residual", "converged", "tolerance", "seconds", "affected_loss_before", "affected_loss_after", "edited_loss_before", "edited_loss_after", "rows_before", "rows_after", "counts", "update_norm", "adapter_sha256", "note", "curvature_rows", "curvature_products", "parameters", "solver_reason", "requested_solver", "factor_source", "factor_out_action", "factor_version", "factor_age_seconds", "factor_changed_fraction", "verification", "utility", "serving")
    class SecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    AFFECTED_LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFFECTED_LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    EDITED_LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EDITED_LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    ROWS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ROWS_AFTER_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_ROWS_FIELD_NUMBER: _ClassVar[int]
    CURVATURE_PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SOLVER_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_SOLVER_FIELD_NUMBER: _ClassVar[int]
    FACTOR_SOURCE_FIELD_NUMBER: _ClassVar[int]
    FACTOR_OUT_ACTION_FIELD_NUMBER: _ClassVar[int]
    FACTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    FACTOR_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FACTOR_CHANGED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FIELD_NUMBER: _ClassVar[int]
    UTILITY_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    solver: str
    preset: str
    curvature: str
    damping: float
    objective: str
    iterations: int
    residual: float
    converged: bool
    tolerance: float
    seconds: _containers.ScalarMap[str, float]
    affected_loss_before: float
    affected_loss_after: float
    edited_loss_before: float
    edited_loss_after: float
    rows_before: int
    rows_after: int
    counts: _containers.ScalarMap[str, int]
    update_norm: float
    adapter_sha256: str
    note: str
    curvature_rows: int
    curvature_products: int
    parameters: int
    solver_reason: str
    requested_solver: str
    factor_source: str
    factor_out_action: str
    factor_version: int
    factor_age_seconds: float
    factor_changed_fraction: float
    verification: Verification
    utility: UtilityCheck
    serving: str
    def __init__(self, solver: _Optional[str] = ..., preset: _Optional[str] = ..., curvature: _Optional[str] = ..., damping: _Optional[float] = ..., objective: _Optional[str] = ..., iterations: _Optional[int] = ..., residual: _Optional[float] = ..., converged: _Optional[bool] = ..., tolerance: _Optional[float] = ..., seconds: _Optional[_Mapping[str, float]] = ..., affected_loss_before: _Optional[float] = ..., affected_loss_after: _Optional[float] = ..., edited_loss_before: _Optional[float] = ..., edited_loss_after: _Optional[float] = ..., rows_before: _Optional[int] = ..., rows_after: _Optional[int] = ..., counts: _Optional[_Mapping[str, int]] = ..., update_norm: _Optional[float] = ..., adapter_sha256: _Optional[str] = ..., note: _Optional[str] = ..., curvature_rows: _Optional[int] = ..., curvature_products: _Optional[int] = ..., parameters: _Optional[int] = ..., solver_reason: _Optional[str] = ..., requested_solver: _Optional[str] = ..., factor_source: _Optional[str] = ..., factor_out_action: _Optional[str] = ..., factor_version: _Optional[int] = ..., factor_age_seconds: _Optional[float] = ..., factor_changed_fraction: _Optional[float] = ..., verification: _Optional[_Union[Verification, _Mapping]] = ..., utility: _Optional[_Union[UtilityCheck, _Mapping]] = ..., serving: _Optional[str] = ...) -> None: ...

class UtilityCheck(_message.Message):
    __slots__ = ("rows", "retain_nll_parent", "retain_nll_after", "max_rise", "passed")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    RETAIN_NLL_PARENT_FIELD_NUMBER: _ClassVar[int]
    RETAIN_NLL_AFTER_FIELD_NUMBER: _ClassVar[int]
    MAX_RISE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    rows: int
    retain_nll_parent: float
    retain_nll_after: float
    max_rise: float
    passed: bool
    def __init__(self, rows: _Optional[int] = ..., retain_nll_parent: _Optional[float] = ..., retain_nll_after: _Optional[float] = ..., max_rise: _Optional[float] = ..., passed: _Optional[bool] = ...) -> None: ...

class Verification(_message.Message):
    __slots__ = ("policy", "passed", "reason", "auc_before", "auc_after", "max_auc", "min_auc", "erased_nll_before", "erased_nll_after", "holdout_nll", "retain_nll_parent", "retain_nll_after", "refine_method", "refine_steps", "refine_seconds", "refine_stopped", "erased_rows", "holdout_rows", "seconds", "basis", "attacks", "rows_ahead_of_base", "rows_recalled", "new_rows")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AUC_BEFORE_FIELD_NUMBER: _ClassVar[int]
    AUC_AFTER_FIELD_NUMBER: _ClassVar[int]
    MAX_AUC_FIELD_NUMBER: _ClassVar[int]
    MIN_AUC_FIELD_NUMBER: _ClassVar[int]
    ERASED_NLL_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ERASED_NLL_AFTER_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_NLL_FIELD_NUMBER: _ClassVar[int]
    RETAIN_NLL_PARENT_FIELD_NUMBER: _ClassVar[int]
    RETAIN_NLL_AFTER_FIELD_NUMBER: _ClassVar[int]
    REFINE_METHOD_FIELD_NUMBER: _ClassVar[int]
    REFINE_STEPS_FIELD_NUMBER: _ClassVar[int]
    REFINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REFINE_STOPPED_FIELD_NUMBER: _ClassVar[int]
    ERASED_ROWS_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_ROWS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    ATTACKS_FIELD_NUMBER: _ClassVar[int]
    ROWS_AHEAD_OF_BASE_FIELD_NUMBER: _ClassVar[int]
    ROWS_RECALLED_FIELD_NUMBER: _ClassVar[int]
    NEW_ROWS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    passed: bool
    reason: str
    auc_before: float
    auc_after: float
    max_auc: float
    min_auc: float
    erased_nll_before: float
    erased_nll_after: float
    holdout_nll: float
    retain_nll_parent: float
    retain_nll_after: float
    refine_method: str
    refine_steps: int
    refine_seconds: float
    refine_stopped: str
    erased_rows: int
    holdout_rows: int
    seconds: float
    basis: str
    attacks: _containers.RepeatedCompositeFieldContainer[AttackScore]
    rows_ahead_of_base: int
    rows_recalled: int
    new_rows: NewRows
    def __init__(self, policy: _Optional[str] = ..., passed: _Optional[bool] = ..., reason: _Optional[str] = ..., auc_before: _Optional[float] = ..., auc_after: _Optional[float] = ..., max_auc: _Optional[float] = ..., min_auc: _Optional[float] = ..., erased_nll_before: _Optional[float] = ..., erased_nll_after: _Optional[float] = ..., holdout_nll: _Optional[float] = ..., retain_nll_parent: _Optional[float] = ..., retain_nll_after: _Optional[float] = ..., refine_method: _Optional[str] = ..., refine_steps: _Optional[int] = ..., refine_seconds: _Optional[float] = ..., refine_stopped: _Optional[str] = ..., erased_rows: _Optional[int] = ..., holdout_rows: _Optional[int] = ..., seconds: _Optional[float] = ..., basis: _Optional[str] = ..., attacks: _Optional[_Iterable[_Union[AttackScore, _Mapping]]] = ..., rows_ahead_of_base: _Optional[int] = ..., rows_recalled: _Optional[int] = ..., new_rows: _Optional[_Union[NewRows, _Mapping]] = ...) -> None: ...

class NewRows(_message.Message):
    __slots__ = ("rows", "mean_nll", "target_nll", "margin", "reproduced", "required", "retain_reproduced_share", "passed")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MEAN_NLL_FIELD_NUMBER: _ClassVar[int]
    TARGET_NLL_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    REPRODUCED_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    RETAIN_REPRODUCED_SHARE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    rows: int
    mean_nll: float
    target_nll: float
    margin: float
    reproduced: int
    required: int
    retain_reproduced_share: float
    passed: bool
    def __init__(self, rows: _Optional[int] = ..., mean_nll: _Optional[float] = ..., target_nll: _Optional[float] = ..., margin: _Optional[float] = ..., reproduced: _Optional[int] = ..., required: _Optional[int] = ..., retain_reproduced_share: _Optional[float] = ..., passed: _Optional[bool] = ...) -> None: ...

class AttackScore(_message.Message):
    __slots__ = ("name", "auc", "auc_low", "auc_high", "max_auc", "min_auc", "rows_flagged", "passed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AUC_FIELD_NUMBER: _ClassVar[int]
    AUC_LOW_FIELD_NUMBER: _ClassVar[int]
    AUC_HIGH_FIELD_NUMBER: _ClassVar[int]
    MAX_AUC_FIELD_NUMBER: _ClassVar[int]
    MIN_AUC_FIELD_NUMBER: _ClassVar[int]
    ROWS_FLAGGED_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    auc: float
    auc_low: float
    auc_high: float
    max_auc: float
    min_auc: float
    rows_flagged: int
    passed: bool
    def __init__(self, name: _Optional[str] = ..., auc: _Optional[float] = ..., auc_low: _Optional[float] = ..., auc_high: _Optional[float] = ..., max_auc: _Optional[float] = ..., min_auc: _Optional[float] = ..., rows_flagged: _Optional[int] = ..., passed: _Optional[bool] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "adapter", "state", "from_version", "to_version", "stage", "fraction", "request_ids", "report", "error", "created_at", "started_at", "finished_at", "counts", "attempts", "already_erased_ids", "replicas_behind", "swap_checks", "request_count")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_ERASED_IDS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_BEHIND_FIELD_NUMBER: _ClassVar[int]
    SWAP_CHECKS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    id: str
    adapter: str
    state: JobState
    from_version: int
    to_version: int
    stage: str
    fraction: float
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    report: EraseReport
    error: JobError
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    counts: _containers.ScalarMap[str, int]
    attempts: int
    already_erased_ids: _containers.RepeatedScalarFieldContainer[str]
    replicas_behind: _containers.RepeatedScalarFieldContainer[str]
    swap_checks: _containers.RepeatedCompositeFieldContainer[SwapCheck]
    request_count: int
    def __init__(self, id: _Optional[str] = ..., adapter: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., stage: _Optional[str] = ..., fraction: _Optional[float] = ..., request_ids: _Optional[_Iterable[str]] = ..., report: _Optional[_Union[EraseReport, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., counts: _Optional[_Mapping[str, int]] = ..., attempts: _Optional[int] = ..., already_erased_ids: _Optional[_Iterable[str]] = ..., replicas_behind: _Optional[_Iterable[str]] = ..., swap_checks: _Optional[_Iterable[_Union[SwapCheck, _Mapping]]] = ..., request_count: _Optional[int] = ...) -> None: ...

class SwapCheck(_message.Message):
    __slots__ = ("replica", "served_path", "max_logprob_error", "probe_margin", "seconds", "weights_confirmed", "served_at")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SERVED_PATH_FIELD_NUMBER: _ClassVar[int]
    MAX_LOGPROB_ERROR_FIELD_NUMBER: _ClassVar[int]
    PROBE_MARGIN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    SERVED_AT_FIELD_NUMBER: _ClassVar[int]
    replica: str
    served_path: str
    max_logprob_error: float
    probe_margin: float
    seconds: float
    weights_confirmed: bool
    served_at: _timestamp_pb2.Timestamp
    def __init__(self, replica: _Optional[str] = ..., served_path: _Optional[str] = ..., max_logprob_error: _Optional[float] = ..., probe_margin: _Optional[float] = ..., seconds: _Optional[float] = ..., weights_confirmed: _Optional[bool] = ..., served_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("adapter", "state", "limit")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    state: JobState
    limit: int
    def __init__(self, adapter: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id", "request_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    request_id: str
    def __init__(self, id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("adapter", "version")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    version: int
    def __init__(self, adapter: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetErasureReceiptRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetReceiptKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReceiptKey(_message.Message):
    __slots__ = ("algorithm", "public_key_pem", "key_id")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    public_key_pem: str
    key_id: str
    def __init__(self, algorithm: _Optional[str] = ..., public_key_pem: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class ErasureReceipt(_message.Message):
    __slots__ = ("receipt", "signature", "key")
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    receipt: bytes
    signature: bytes
    key: ReceiptKey
    def __init__(self, receipt: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., key: _Optional[_Union[ReceiptKey, _Mapping]] = ...) -> None: ...

class PurgeHistoryRequest(_message.Message):
    __slots__ = ("adapter", "before_version")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    BEFORE_VERSION_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    before_version: int
    def __init__(self, adapter: _Optional[str] = ..., before_version: _Optional[int] = ...) -> None: ...

class FactorCache(_message.Message):
    __slots__ = ("version", "method")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    version: int
    method: str
    def __init__(self, version: _Optional[int] = ..., method: _Optional[str] = ...) -> None: ...

class PurgeHistoryResponse(_message.Message):
    __slots__ = ("adapter", "purged_versions", "purged_factor_caches", "purged_payloads", "purged_at", "retained_versions")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PURGED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PURGED_FACTOR_CACHES_FIELD_NUMBER: _ClassVar[int]
    PURGED_PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    PURGED_AT_FIELD_NUMBER: _ClassVar[int]
    RETAINED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    purged_versions: _containers.RepeatedScalarFieldContainer[int]
    purged_factor_caches: _containers.RepeatedCompositeFieldContainer[FactorCache]
    purged_payloads: int
    purged_at: _timestamp_pb2.Timestamp
    retained_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, adapter: _Optional[str] = ..., purged_versions: _Optional[_Iterable[int]] = ..., purged_factor_caches: _Optional[_Iterable[_Union[FactorCache, _Mapping]]] = ..., purged_payloads: _Optional[int] = ..., purged_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retained_versions: _Optional[_Iterable[int]] = ...) -> None: ...
