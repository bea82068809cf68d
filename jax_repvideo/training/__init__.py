"""RepVideo fine-tuning: tfds data pipeline and the optax train step."""
