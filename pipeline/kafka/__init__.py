"""Kafka for rollcast: clients built from the settings (:mod:`~pipeline.kafka.clients`), the forecast job's
bulk producer (:mod:`~pipeline.kafka.producer`), the partitioning rule every producer shares
(:mod:`~pipeline.kafka.partitioning`), record headers (:mod:`~pipeline.kafka.headers`), readers of a
whole topic (:mod:`~pipeline.kafka.readers`), the group and topic facts the store's fence needs
(:mod:`~pipeline.kafka.group`) and the fetch guard's counter (:mod:`~pipeline.kafka.telemetry`)."""
