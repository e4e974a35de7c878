"""A log-log line chart of seconds per stage against events, as a PNG, in pure Python.

matplotlib and Pillow are not dependencies of the project; a chart of a few lines needs
neither: an RGB canvas, straight lines, a 3×5 bitmap font and zlib.
"""

import math
import struct
import zlib
from pathlib import Path

WIDTH, HEIGHT = 960, 560
LEFT, RIGHT, TOP, BOTTOM = 70, 230, 40, 60
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (215, 215, 215)
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 0, 0),
]  # fmt: skip
# Each glyph: five rows of three bits (an octal digit per row, left pixel = 4).
FONT = {
    "0": "75557", "1": "26227", "2": "71747", "3": "71317", "4": "55711", "5": "74717", "6": "74757",
    "7": "71111", "8": "75757", "9": "75717", "A": "25755", "B": "65656", "C": "34443", "D": "65556",
    "E": "74647", "F": "74644", "G": "34553", "H": "55755", "I": "72227", "J": "11152", "K": "55655",
    "L": "44447", "M": "57755", "N": "65555", "O": "25552", "P": "65644", "Q": "25563", "R": "65655",
    "S": "34216", "T": "72222", "U": "55557", "V": "55552", "W": "55775", "X": "55255", "Y": "55222",
    "Z": "71247", " ": "00000", ".": "00002", ",": "00024", "-": "00700", "/": "11244", "(": "12221",
    ")": "42224", "=": "07070", ":": "02020", "%": "51245", "<": "12421", ">": "42124", "_": "00007",
    "@": "25743", "+": "02720",
}  # fmt: skip
SCALE = 2


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(WHITE) * width * height)

    def dot(self, x: int, y: int, color: tuple[int, int, int], size: int = 1) -> None:
        for dx in range(size):
            for dy in range(size):
                px, py = x + dx, y + dy
                if 0 <= px < self.width and 0 <= py < self.height:
                    i = 3 * (py * self.width + px)
                    self.pixels[i : i + 3] = bytes(color)

    def line(self, a: tuple[int, int], b: tuple[int, int], color: tuple[int, int, int], size: int = 2) -> None:
        steps = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for k in range(steps + 1):
            self.dot(round(a[0] + (b[0] - a[0]) * k / steps), round(a[1] + (b[1] - a[1]) * k / steps), color, size)

    def text(self, x: int, y: int, words: str, color: tuple[int, int, int] = BLACK) -> None:
        for n, char in enumerate(words.upper()):
            for row, bits in enumerate(FONT.get(char, FONT[" "])):
                for col in range(3):
                    if int(bits) & (4 >> col):
                        self.dot(x + n * 4 * SCALE + col * SCALE, y + row * SCALE, color, SCALE)

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width]) for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        )


def _decades(low: float, high: float) -> range:
    return range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)


def _label(power: int) -> str:
    value = 10.0**power
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:g}{unit}"
    return f"{value:g}"


def draw_stage_chart(series: dict[str, list[tuple[float, float]]], path: Path) -> None:
    """One line per stage through its (events, seconds) points, both axes logarithmic."""
    points = [p for values in series.values() for p in values if p[0] > 0 and p[1] > 0]
    if not points:
        raise ValueError("draw_stage_chart: no positive (events, seconds) point to draw")
    xs, ys = (
        _decades(min(p[0] for p in points), max(p[0] for p in points)),
        _decades(min(p[1] for p in points), max(p[1] for p in points)),
    )
    x0, x1 = xs.start, max(xs.stop - 1, xs.start + 1)
    y0, y1 = ys.start, max(ys.stop - 1, ys.start + 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def at(x: float, y: float) -> tuple[int, int]:
        return (
            round(LEFT + (math.log10(x) - x0) / (x1 - x0) * plot_w),
            round(TOP + plot_h - (math.log10(y) - y0) / (y1 - y0) * plot_h),
        )

    canvas = Canvas(WIDTH, HEIGHT)
    for power in range(x0, x1 + 1):
        x = at(10.0**power, 10.0**y0)[0]
        canvas.line((x, TOP), (x, TOP + plot_h), GREY, 1)
        canvas.text(x - 8, TOP + plot_h + 8, _label(power))
    for power in range(y0, y1 + 1):
        y = at(10.0**x0, 10.0**power)[1]
        canvas.line((LEFT, y), (LEFT + plot_w, y), GREY, 1)
        canvas.text(LEFT - 10 - 8 * len(f"{10.0**power:g}"), y - 5, f"{10.0**power:g}")
    canvas.line((LEFT, TOP), (LEFT, TOP + plot_h), BLACK, 1)
    canvas.line((LEFT, TOP + plot_h), (LEFT + plot_w, TOP + plot_h), BLACK, 1)
    canvas.text(LEFT + 60, 12, "WEEKLY JOB: SECONDS PER STAGE AGAINST EVENTS (LOG-LOG)")
    canvas.text(LEFT + plot_w // 2 - 40, HEIGHT - 24, "EVENTS IN LOG")
    canvas.text(8, TOP - 20, "SECONDS")
    for n, (stage, values) in enumerate(series.items()):
        color = PALETTE[n % len(PALETTE)]
        placed = [at(x, y) for x, y in sorted(values) if x > 0 and y > 0]
        for a, b in zip(placed, placed[1:], strict=False):
            canvas.line(a, b, color, 2)
        for x, y in placed:
            canvas.dot(x - 3, y - 3, color, 7)
        legend_y = TOP + 10 + 20 * n
        canvas.line((WIDTH - RIGHT + 20, legend_y + 4), (WIDTH - RIGHT + 44, legend_y + 4), color, 3)
        canvas.text(WIDTH - RIGHT + 52, legend_y, stage)
    path.write_bytes(canvas.png())
