// Server-sent events, parsed as the HTML standard says: a line ends at CRLF, LF or CR (nothing
// else), a blank line ends an event, `:` lines are comments (the server's pings). A CR at the end
// of a chunk may be half of a CRLF split by the network, so it waits for the next chunk.
export class EventStreamParser {
  #buffer = "";
  #event = "";
  #data = [];

  // Add text; return the {event, data} records it completes (data: the joined data lines).
  feed(text) {
    this.#buffer += text;
    const done = [];
    const lineEnd = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = lineEnd.exec(this.#buffer)) !== null) {
      if (match[0] === "\r" && lineEnd.lastIndex === this.#buffer.length) break;
      const record = this.#line(this.#buffer.slice(start, match.index));
      if (record) done.push(record);
      start = lineEnd.lastIndex;
    }
    this.#buffer = this.#buffer.slice(start);
    return done;
  }

  #line(line) {
    if (line === "") {
      const record = this.#data.length ? { event: this.#event || "message", data: this.#data.join("\n") } : null;
      this.#event = "";
      this.#data = [];
      return record;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.#event = value;
    else if (field === "data") this.#data.push(value);
    return null;
  }
}

// The events of a fetch() response's body, as they arrive.
export async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new EventStreamParser();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    yield* parser.feed(value);
  }
}
