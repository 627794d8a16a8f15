"""Data: training records, named public sets, training-record building, refusals and the refusal judge, media.

`safegate.data` was a module before the 0.2 layout; its public names still resolve here, lazily.
"""

from safegate._lazy import lazy_attributes

__getattr__ = lazy_attributes(
    __name__,
    {
        name: "safegate.data.records"
        for name in (
            "load_records",
            "validate_record",
            "prompt_messages",
            "format_prompt",
            "assistant_continuation",
            "label_id",
        )
    },
)
