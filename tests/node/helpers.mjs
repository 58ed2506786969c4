// Small helpers every SDK scenario script shares.

/** A promise that rejects after ``ms`` (race it against one that may hang). */
export function deadline(ms, what) {
  return new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), ms));
}

/** Poll ``predicate`` every 10 ms until it holds; throw after ``ms``. */
export async function until(predicate, what, ms = 10000) {
  const started = Date.now();
  while (!predicate()) {
    if (Date.now() - started > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** The error a promise rejects with, as plain data (null if it resolves within 10 s). */
export async function errorOf(promise) {
  try {
    await Promise.race([promise, deadline(10000, 'request')]);
    return null;
  } catch (error) {
    return {
      name: error.name,
      message: String(error.message),
      code: error.code ?? null,
      statusCode: error.statusCode ?? null,
    };
  }
}
