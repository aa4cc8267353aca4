"""The amqp transport."""
