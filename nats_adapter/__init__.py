"""The NATS adapter both services share: connecting with back-off, the lean request
multiplexer, direct gets, and creating the streams and buckets. Gateways and history workers
import it; neither imports the other."""
