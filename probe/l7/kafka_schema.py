"""Kafka API tables: names (snake_case), first flexible version, highest known version.

Source: Apache Kafka's ``clients/src/main/resources/common/message/*Request.json``.
"""

from __future__ import annotations

# api_key: (name, first flexible version or None, highest version known to clients)
APIS: dict[int, tuple[str, int | None, int]] = {
    0: ("produce", 9, 13),
    1: ("fetch", 12, 18),
    2: ("list_offsets", 6, 10),
    3: ("metadata", 9, 13),
    4: ("leader_and_isr", 4, 7),
    5: ("stop_replica", 2, 4),
    6: ("update_metadata", 6, 8),
    7: ("controlled_shutdown", 3, 3),
    8: ("offset_commit", 8, 10),
    9: ("offset_fetch", 6, 10),
    10: ("find_coordinator", 3, 6),
    11: ("join_group", 6, 9),
    12: ("heartbeat", 4, 4),
    13: ("leave_group", 4, 5),
    14: ("sync_group", 4, 5),
    15: ("describe_groups", 5, 6),
    16: ("list_groups", 3, 5),
    17: ("sasl_handshake", None, 1),
    18: ("api_versions", 3, 4),
    19: ("create_topics", 5, 7),
    20: ("delete_topics", 4, 6),
    21: ("delete_records", 2, 2),
    22: ("init_producer_id", 2, 6),
    23: ("offset_for_leader_epoch", 4, 4),
    24: ("add_partitions_to_txn", 3, 5),
    25: ("add_offsets_to_txn", 3, 4),
    26: ("end_txn", 3, 5),
    27: ("write_txn_markers", 1, 2),
    28: ("txn_offset_commit", 3, 5),
    29: ("describe_acls", 2, 3),
    30: ("create_acls", 2, 3),
    31: ("delete_acls", 2, 3),
    32: ("describe_configs", 4, 4),
    33: ("alter_configs", 2, 2),
    34: ("alter_replica_log_dirs", 2, 2),
    35: ("describe_log_dirs", 2, 4),
    36: ("sasl_authenticate", 2, 2),
    37: ("create_partitions", 2, 3),
    38: ("create_delegation_token", 2, 3),
    39: ("renew_delegation_token", 2, 2),
    40: ("expire_delegation_token", 2, 2),
    41: ("describe_delegation_token", 2, 3),
    42: ("delete_groups", 2, 2),
    43: ("elect_leaders", 2, 2),
    44: ("incremental_alter_configs", 1, 1),
    45: ("alter_partition_reassignments", 0, 1),
    46: ("list_partition_reassignments", 0, 0),
    47: ("offset_delete", None, 0),
    48: ("describe_client_quotas", 1, 1),
    49: ("alter_client_quotas", 1, 1),
    50: ("describe_user_scram_credentials", 0, 0),
    51: ("alter_user_scram_credentials", 0, 0),
    52: ("vote", 0, 2),
    53: ("begin_quorum_epoch", 1, 1),
    54: ("end_quorum_epoch", 1, 1),
    55: ("describe_quorum", 0, 2),
    56: ("alter_partition", 0, 3),
    57: ("update_features", 0, 2),
    58: ("envelope", 0, 0),
    59: ("fetch_snapshot", 0, 1),
    60: ("describe_cluster", 0, 2),
    61: ("describe_producers", 0, 0),
    62: ("broker_registration", 0, 4),
    63: ("broker_heartbeat", 0, 1),
    64: ("unregister_broker", 0, 0),
    65: ("describe_transactions", 0, 0),
    66: ("list_transactions", 0, 2),
    67: ("allocate_producer_ids", 0, 0),
    68: ("consumer_group_heartbeat", 0, 1),
    69: ("consumer_group_describe", 0, 1),
    70: ("controller_registration", 0, 0),
    71: ("get_telemetry_subscriptions", 0, 0),
    72: ("push_telemetry", 0, 0),
    73: ("assign_replicas_to_dirs", 0, 0),
    74: ("list_client_metrics_resources", 0, 0),
    75: ("describe_topic_partitions", 0, 0),
    76: ("share_group_heartbeat", 0, 1),
    77: ("share_group_describe", 0, 1),
    78: ("share_fetch", 0, 1),
    79: ("share_acknowledge", 0, 1),
    80: ("add_raft_voter", 0, 0),
    81: ("remove_raft_voter", 0, 0),
    82: ("update_raft_voter", 0, 0),
    83: ("initialize_share_group_state", 0, 0),
    84: ("read_share_group_state", 0, 0),
    85: ("write_share_group_state", 0, 0),
    86: ("delete_share_group_state", 0, 0),
    87: ("read_share_group_state_summary", 0, 0),
}

#: Versions above the highest known still accepted as plausible (newer brokers/clients).
VERSION_SLACK = 3

#: Responses whose error_code is a top-level field: api_key -> (first version having it,
#: first version where throttle_time_ms precedes it, or None if it never does).
TOP_LEVEL_ERROR: dict[int, tuple[int, int | None]] = {
    1: (7, 1),     # fetch
    10: (0, 1),    # find_coordinator (v0-3; v4+ has a coordinators array)
    11: (0, 2),    # join_group
    12: (0, 1),    # heartbeat
    13: (0, 1),    # leave_group
    14: (0, 1),    # sync_group
    16: (0, 1),    # list_groups
    17: (0, None),  # sasl_handshake
    18: (0, None),  # api_versions
    22: (0, 0),    # init_producer_id
    25: (0, 0),    # add_offsets_to_txn
    26: (0, 0),    # end_txn
    29: (0, 0),    # describe_acls
    36: (0, None),  # sasl_authenticate
    38: (0, None),  # create_delegation_token
    39: (0, None),  # renew_delegation_token
    40: (0, None),  # expire_delegation_token
    41: (0, None),  # describe_delegation_token
    43: (1, 0),    # elect_leaders
    45: (0, 0),    # alter_partition_reassignments
    46: (0, 0),    # list_partition_reassignments
    47: (0, None),  # offset_delete
    48: (0, 0),    # describe_client_quotas
    55: (0, None),  # describe_quorum
    57: (0, 0),    # update_features
    60: (0, 0),    # describe_cluster
    62: (0, 0),    # broker_registration
    63: (0, 0),    # broker_heartbeat
    64: (0, 0),    # unregister_broker
    66: (0, 0),    # list_transactions
    67: (0, 0),    # allocate_producer_ids
    68: (0, 0),    # consumer_group_heartbeat
    70: (0, 0),    # controller_registration
    71: (0, 0),    # get_telemetry_subscriptions
    72: (0, 0),    # push_telemetry
    76: (0, 0),    # share_group_heartbeat
    78: (0, 0),    # share_fetch
    79: (0, 0),    # share_acknowledge
}


def api_name(api_key: int) -> str:
    entry = APIS.get(api_key)
    return entry[0] if entry else f"unknown_{api_key}"


def is_flexible(api_key: int, api_version: int) -> bool:
    entry = APIS.get(api_key)
    return entry is not None and entry[1] is not None and api_version >= entry[1]


def request_header_version(api_key: int, api_version: int) -> int:
    if api_key == 7 and api_version == 0:
        return 0  # ControlledShutdown v0 has no client_id
    return 2 if is_flexible(api_key, api_version) else 1


def response_header_version(api_key: int, api_version: int) -> int:
    if api_key == 18:
        return 0  # ApiVersions responses always use header v0
    return 1 if is_flexible(api_key, api_version) else 0


def plausible_version(api_key: int, api_version: int) -> bool:
    entry = APIS.get(api_key)
    return entry is not None and 0 <= api_version <= entry[2] + VERSION_SLACK
